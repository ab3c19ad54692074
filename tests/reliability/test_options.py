"""Counts, sizes, seeds, fractions and devices are checked when the command line is parsed.

A bad value exits with status 2 and one line naming the option and the accepted range, before any work
(nothing is written), and every such option states its range in ``--help``.
"""

from __future__ import annotations

import pytest
import torch

from protloc.cli import build_parser, main

SEQ = "MKTAYIAKQRQ"
CASES = [
    (["predict", "--sequence", SEQ, "--batch-size", "0"], "--batch-size", "integer >= 1"),
    (["predict", "--sequence", SEQ, "--batch-size", "-3"], "--batch-size", "integer >= 1"),
    (["predict", "--sequence", SEQ, "--samples", "0"], "--samples", "integer >= 1"),
    (["predict", "--sequence", SEQ, "--seed", "-1"], "--seed", "<= 4294967295"),
    (["predict", "--sequence", SEQ, "--seed", "99999999999"], "--seed", "<= 4294967295"),
    (["predict", "--sequence", SEQ, "--seed", "1.5"], "--seed", "'1.5'"),
    (["predict", "--sequence", SEQ, "--temperature", "0"], "--temperature", "number > 0"),
    (["predict", "--sequence", SEQ, "--temperature", "nan"], "--temperature", "finite"),
    (["predict", "--sequence", SEQ, "--top-k-fraction", "1.5"], "--top-k-fraction", "<= 1"),
    (["predict", "--sequence", SEQ, "--steps", "0"], "--steps", "integer >= 1"),
    (["predict", "--sequence", SEQ, "--device", "tpu"], "--device", "tpu"),
    (["embed", "--store", "s.zarr", "--batch-size", "-3"], "--batch-size", "integer >= 1"),
    (["embed", "--store", "s.zarr", "--shard-size", "0"], "--shard-size", "integer >= 1"),
    (["spectrum", "--embeddings", "e.h5ad", "--clusters", "0"], "--clusters", "integer >= 1"),
    (["interpret", "--store", "s.zarr", "--protein", "P", "--top", "0"], "--top", "integer >= 1"),
    (["interpret", "--store", "s.zarr", "--protein", "P", "--crops", "0"], "--crops", "integer >= 1"),
    (["screen", "--sequence", SEQ, "--truncate", "0"], "--truncate", "integer >= 1"),
    (["screen", "--sequence", SEQ, "--delete", "-2"], "--delete", "integer >= 1"),
    (["atlas", "--embeddings", "e.h5ad", "--thumbnails", "-1"], "--thumbnails", "integer >= 0"),
    (["world", "make", "--fovs", "0"], "--fovs", "integer >= 1"),
    (["world", "make", "--workers", "0"], "--workers", "integer >= 1"),
    (["prepare", "--fovs", "f.csv", "--workers", "0"], "--workers", "integer >= 1"),
    (["demo", "--train-scale", "-1"], "--train-scale", "number > 0"),
    (["evaluate", "--store", "s.zarr", "--max-crops", "0"], "--max-crops", "integer >= 1"),
    (["evaluate", "--store", "s.zarr", "--sampling-seed", "-5"], "--sampling-seed", "integer >= 0"),
]
if not torch.cuda.is_available():
    CASES.append((["predict", "--sequence", SEQ, "--device", "cuda"], "--device", "no usable CUDA"))


@pytest.mark.parametrize("argv, option, text", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_option_is_one_line_naming_it(tmp_path, capsys, argv, option, text) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"argument {option}" in err[0] and text in err[0], err[0]
    assert not out.exists()


def _typed_options(parser):
    for action in parser._actions:
        if getattr(action.type, "range_text", None):
            yield parser.prog, action
        if isinstance(action.choices, dict):  # a subcommand table
            for sub in dict.fromkeys(action.choices.values()):
                yield from _typed_options(sub)


def test_help_states_every_range() -> None:
    found = list(_typed_options(build_parser()))
    assert len(found) > 40  # counts, seeds, fractions and devices of every command
    for prog, action in found:
        assert f"[{action.type.range_text}]" in action.help, (prog, action.option_strings)


def test_good_values_still_parse() -> None:
    args = build_parser().parse_args(
        ["predict", "--sequence", SEQ, "--out", "o", "--seed", "4294967295", "--top-k-fraction", "1", "--device", "cpu"]
    )
    assert (args.seed, args.top_k_fraction, args.device) == (4294967295, 1.0, "cpu")


@pytest.mark.parametrize("kwargs", [{"batch_size": -3}, {"batch_size": 0}, {"shard_size": 0}, {"batch_size": 2.5}])
def test_the_python_embed_checks_its_sizes_too(tmp_path, kwargs) -> None:
    from protloc.errors import ConfigError
    from protloc.eval.embed import embed

    with pytest.raises(ConfigError, match="must be a positive integer"):
        embed("pretrained:cytoself-tiny", tmp_path / "s.zarr", tmp_path / "e.h5ad", **kwargs)
    assert not list(tmp_path.iterdir())
