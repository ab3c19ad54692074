"""The command line end to end on a tiny reference world."""

from __future__ import annotations

import json

import pytest

from protloc.cli import build_parser, main
from protloc.data.io import CropStore, read_table


@pytest.mark.parametrize("argv", [[], ["world"], ["world", "make"], ["prepare"], ["demo"]])
def test_help_has_example(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out


def test_every_subcommand_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"demo", "world", "prepare"} <= set(sub.choices)


def _leaf_parsers(parser, prefix=()):
    """(command words, parser) of every leaf subcommand."""
    subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    if not subs:
        yield prefix, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaf_parsers(child, (*prefix, name))


def _examples(parser) -> list[list[str]]:
    """The example command lines of a parser's epilog (continuation lines joined)."""
    import shlex

    text = (parser.epilog or "").replace("\\\n", " ")
    return [shlex.split(line.strip())[1:] for line in text.splitlines() if line.strip().startswith("protloc ")]


def test_every_help_example_parses_and_its_settings_exist():
    """The examples in --help are runnable: they parse, and every --set key names a config field."""
    from protloc.config import load_config
    from protloc.data.prepare import PrepareConfig
    from protloc.train.celle import TrainCelleConfig
    from protloc.train.cytoself import TrainCytoselfConfig
    from protloc.train.vqgan import TrainVQGANConfig

    configs = {
        ("prepare",): PrepareConfig,
        ("train", "cytoself"): TrainCytoselfConfig,
        ("train", "vqgan"): TrainVQGANConfig,
        ("train", "celle"): TrainCelleConfig,
    }
    parser = build_parser()
    checked = 0
    for words, leaf in _leaf_parsers(parser):
        examples = _examples(leaf)
        assert examples, f"protloc {' '.join(words)} --help has no example"
        for argv in examples:
            args = parser.parse_args(argv)
            overrides = getattr(args, "set", None) or []
            if overrides and words in configs:
                load_config(configs[words], overrides=overrides)
            checked += 1
    assert checked >= 10


def test_world_then_prepare(tmp_path, capsys):
    world = tmp_path / "world"
    rc = main(
        ["-q", "world", "make", "--out", str(world), "--proteins", "4", "--fovs", "2", "--size", "256", "--seed", "3"]
    )
    assert rc == 0
    meta = json.loads((world / "world.json").read_text())
    assert meta["seed"] == 3
    fovs = read_table(world / "fovs.csv")
    assert len(fovs) == 8
    # the engineered constructs are in the sequences but have no fields of view
    proteins = read_table(world / "proteins.csv")
    assert proteins["protein_id"].str.startswith("GFP").any()
    rc = main(
        [
            "-q",
            "prepare",
            "--fovs",
            str(world / "fovs.csv"),
            "--sequences",
            str(world / "sequences.fasta"),
            "--out",
            str(tmp_path / "prep"),
            "--set",
            "params.celle_size=128",
        ]
    )
    assert rc == 0
    store = CropStore.open(tmp_path / "prep" / "cytoself.zarr")
    assert len(store) > 0
    assert set(store.obs["protein_id"]) <= set(fovs["protein_id"])
    # the existing output is refused, with one line and exit status 2
    capsys.readouterr()
    rc = main(["-q", "world", "make", "--out", str(world), "--proteins", "2", "--fovs", "1", "--size", "256"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0]


def test_interrupt_says_how_to_continue(monkeypatch, capsys, tmp_path):
    import protloc.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_weights", interrupted)
    rc = main(["weights"])
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted" in err and "run the same command again" in err
    # training: --resume only where there is a checkpoint to resume (it fails otherwise)
    monkeypatch.setattr(cli, "_cmd_train_cytoself", interrupted)
    argv = ["train", "cytoself", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "run")]
    assert main(argv) == 130
    assert "no checkpoint was saved yet" in capsys.readouterr().err
    (tmp_path / "run" / "last").mkdir(parents=True)
    (tmp_path / "run" / "last" / "trainer_state.pt").write_bytes(b"")
    assert main(argv) == 130
    assert "--resume" in capsys.readouterr().err


def test_weights_lists_the_shipped_models(capsys):
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    for name in ("cytoself-small", "cytoself-tiny", "vqgan-nucleus-tiny", "vqgan-threshold-tiny", "celle-tiny"):
        assert name in out
    assert main(["weights", "celle-tiny"]) == 0
    assert json.loads(capsys.readouterr().out)["command"].startswith("protloc train celle")
    assert main(["weights", "celle-huge"]) == 2


def test_weights_write_config_reproduces_the_recipe(tmp_path, capsys):
    from protloc.config import load_config
    from protloc.pretrained import read_recipe
    from protloc.train.vqgan import TrainVQGANConfig

    path = tmp_path / "recipe.yaml"
    assert main(["weights", "vqgan-threshold-tiny", "--write-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"--config {path}" in out and "protloc train vqgan --kind threshold" in out
    cfg = load_config(TrainVQGANConfig, path=path)
    assert cfg.kind == "threshold"
    assert cfg.schedule.max_steps == read_recipe("vqgan-threshold-tiny")["training_config"]["schedule"]["max_steps"]
    assert main(["weights", "--write-config", str(path)]) == 2
