"""What each ``protloc`` command does, one module per command, callable from Python.

Every module has computing functions (keyword-only options; results as AnnData, pandas DataFrames or
plain dicts, as in scanpy) and a ``run_*`` function that checks its inputs, refuses a non-empty output
folder unless ``overwrite`` (:func:`protloc._fs.check_out`), computes and writes the
command's output folder atomically. :mod:`protloc.cli` parses the command line into these functions and
:mod:`protloc.api` re-exports the computing functions.

=====================  ==================================================================================
module                 command: computing functions -> ``run_*``
=====================  ==================================================================================
:mod:`.prepare`        ``prepare``: :func:`~.prepare.run_prepare`
:mod:`.train`          ``train``: :func:`~.train.train_config` -> :func:`~.train.run_train`
:mod:`.embed`          ``embed``: :func:`~.embed.embed` (AnnData), :func:`~.embed.run_embed`
:mod:`.atlas`          ``atlas``: :func:`~.atlas.load_embeddings`, :func:`~.atlas.atlas` -> :func:`~.atlas.run_atlas`
:mod:`.spectrum`       ``spectrum``: :func:`~.spectrum.spectra` -> :func:`~.spectrum.run_spectrum`
:mod:`.interpret`      ``interpret``: :func:`~.interpret.feature_zeroing` -> :func:`~.interpret.run_interpret`
:mod:`.predict`        ``predict``: :func:`~.predict.predict_sequences` (AnnData) -> :func:`~.predict.run_predict`
:mod:`.fill`           ``fill``: :func:`~.fill.fill_masked` (DataFrames) -> :func:`~.fill.run_fill`
:mod:`.screen`         ``screen``: :func:`~.screen.screen_variants`, :func:`~.screen.screen`,
                       :func:`~.screen.attention` -> :func:`~.screen.run_screen`
:mod:`.evaluate`       ``evaluate``: :func:`~.evaluate.evaluate_models` -> :func:`~.evaluate.run_evaluate`
=====================  ==================================================================================

:mod:`.inputs` holds what several commands read the same way (checkpoints, sequences, the nucleus and
threshold images a CELL-E sees). ``world``, ``import``, ``weights`` and ``demo`` are single calls of
:mod:`protloc.data.world.make`, :mod:`protloc.data.imports`, :mod:`protloc.pretrained` and
:mod:`protloc.demo`.

Import order: ``... -> analysis -> plotting -> commands -> demo, report, api -> cli``.
"""
