"""``protloc demo`` end to end on a small world with the shipped weights, and its report in headless Chromium.

The full demo (all 384 proteins) is what ``make demo`` runs; here a 12-protein world keeps the whole
pipeline -- world, prepare, embed, atlas, spectra, feature zeroing, evaluation, gallery, constructs,
screens, report -- to about a minute. ``--allow-mismatch`` is needed because the shipped weights were
trained on the full world (the report then warns).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from protloc import cli
from protloc.demo import DemoConfig, run_demo
from protloc.errors import ConfigError

ARGS = [
    "--proteins",
    "12",
    "--fovs",
    "4",
    "--allow-mismatch",
    "--gallery",
    "3",
    "--samples",
    "2",
    "--construct-nuclei",
    "2",
    "--eval-crops",
    "24",
    "--celle-proteins",
    "8",
    "--workers",
    "1",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert cli.main(["-q", "demo", "--out", str(out), *ARGS]) == 0
    return out


def test_demo_writes_every_stage_and_the_report(demo_dir: Path, capsys) -> None:
    report = demo_dir / "report"
    page = (report / "index.html").read_text()
    metrics = json.loads((report / "metrics.json").read_text())
    for key in ("atlas", "spectrum", "evaluate", "gallery", "constructs", "nls_scan", "attention", "summary"):
        assert key in metrics, key
    assert metrics["weights"] == "shipped" and metrics["mismatch"] is True
    assert "some “held-out” proteins may have been seen in training" in page
    # figures are embedded, not linked: the page needs nothing beside it
    assert 'src="data:image/png;base64,' in page
    assert not re.search(r"src=\"(?!data:)", page) and "http://" not in page and "https://" not in page
    pngs = {p.name for p in report.glob("*.png")}
    assert {"atlas.png", "spectrum_heatmap.png", "constructs.png", "nls_scan.png", "attention.png"} <= pngs
    n_gallery = len(metrics["gallery"]["items"])  # one per held-out protein, at most --gallery
    assert 1 <= n_gallery <= 3 and len([p for p in pngs if p.startswith("gallery_")]) == n_gallery
    ev = metrics["evaluate"]["over_proteins"]
    assert {"CELL-E + encoder", "CELL-E one-hot", "no sequence", "VQGAN ceiling", "sequence baseline"} <= set(ev)
    assert 0.0 <= ev["CELL-E + encoder"]["nucleus_proportion_accuracy"][0] <= 1.0
    # the CELL-E stages see only held-out (test-partition) proteins
    assert metrics["gallery"]["split"] == "test"
    world = json.loads((demo_dir / "celle_world" / "world.json").read_text())
    assert world["mode"] == "proteome" and world["arguments"]["partitions"] == {"train": 8, "test": 8}
    rows = metrics["constructs"]["rows"]
    assert [r["construct"] for r in rows] == ["GFP", "GFP_NLS_nucleoplasmin", "GFP_NLS_NMyc", "GFP_random_peptide"]
    assert all(r["images"] == 2 for r in rows)
    assert metrics["atlas"]["crops"] > 0


def test_demo_resumes_and_refuses_other_settings(demo_dir: Path, capsys) -> None:
    before = {p: p.stat().st_mtime_ns for p in (demo_dir / "atlas").iterdir()}
    assert cli.main(["-q", "demo", "--out", str(demo_dir), *ARGS]) == 0
    stages = json.loads((demo_dir / "stages.json").read_text())
    reused = ("world", "prepared", "celle_world", "celle_prepared", "cytoself", "atlas", "evaluate", "gallery")
    assert all(stages[s]["reused"] for s in reused)
    assert {p: p.stat().st_mtime_ns for p in (demo_dir / "atlas").iterdir()} == before
    out = capsys.readouterr().out
    assert "demo stages" in out and "reused" in out and "report:" in out
    # another setting in the same folder: one clear line, nothing touched
    rc = cli.main(["-q", "demo", "--out", str(demo_dir), *ARGS, "--gallery", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "other settings (gallery)" in err and "--fresh" in err
    assert {p: p.stat().st_mtime_ns for p in (demo_dir / "atlas").iterdir()} == before


def test_demo_trains_the_four_models_from_the_shipped_recipes(demo_dir: Path, tmp_path: Path) -> None:
    """``make demo TRAIN=1`` on a small world, schedules scaled to a few steps (the world is reused)."""
    out = tmp_path / "trained"
    for stage in ("world", "prepared"):
        shutil.copytree(demo_dir / stage, out / stage)
    args = [a for a in ARGS if a != "--allow-mismatch"]
    train = ["--train", "--train-scale", "0.004", "--celle-train-proteins", "16"]
    assert cli.main(["-q", "demo", "--out", str(out), *args, *train]) == 0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["weights"] == "trained here" and metrics["mismatch"] is False
    assert set(metrics["models"]) == {"cytoself", "vqgan_nucleus", "vqgan_threshold", "celle"}
    for name, steps in (("cytoself", 18), ("vqgan_nucleus", 6), ("vqgan_threshold", 6), ("celle", 20)):
        assert (out / "train" / name / "done.json").is_file()
        recipe = yaml.safe_load((out / "train" / f"{name}.recipe.yaml").read_text())
        assert recipe["schedule"]["max_steps"] == steps, name  # the shipped recipe, scaled
        assert Path(metrics["models"][name]).parent == out / "train"
    # the small cytoself's warm-up shrinks with its schedule (100 steps of 4,500 -> 1 of 18)
    assert yaml.safe_load((out / "train" / "cytoself.recipe.yaml").read_text())["schedule"]["warmup_steps"] == 1
    assert "some “held-out” proteins" not in (out / "report" / "index.html").read_text()


def test_shipped_weights_need_the_default_world(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trained on the default reference world"):
        run_demo(tmp_path / "d", config=DemoConfig(proteins=12))
    assert not (tmp_path / "d").exists()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _render(page: Path, profile: Path) -> tuple[list[str], dict[str, str]]:
    """Open a page in headless Chromium: its console messages and the ``data-*`` attributes of ``<body>``."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs Debian's chromium before the tests")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=8000",
        "--window-size=1280,900",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:500]
    return console, dict(re.findall(r'(data-[a-z]+)="([^"]*)"', body.group(1)))


def test_report_renders_in_headless_chromium(demo_dir: Path, tmp_path: Path) -> None:
    console, attrs = _render(demo_dir / "report" / "index.html", tmp_path / "profile")
    assert console == [], "console messages:\n" + "\n".join(console)
    assert attrs.get("data-errors") == "0", attrs
    assert attrs.get("data-atlas", "").startswith("rendered:"), attrs
    assert int(attrs["data-atlas"].split(":")[1]) > 0
    n = len(json.loads((demo_dir / "report" / "metrics.json").read_text())["gallery"]["items"])
    assert attrs.get("data-gallery") == f"{n}/{n}", attrs


def test_the_browser_check_catches_a_broken_page(demo_dir: Path, tmp_path: Path) -> None:
    """The check above can fail: a script error and a broken gallery image are both caught."""
    page = (demo_dir / "report" / "index.html").read_text()
    at = page.index('<div id="gallery">')
    broken = page[:at] + page[at:].replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1)
    broken = broken.replace("</main>", "<script>notDefinedAnywhere();</script></main>", 1)
    path = tmp_path / "broken.html"
    path.write_text(broken)
    console, attrs = _render(path, tmp_path / "profile")
    assert any("notDefinedAnywhere" in line for line in console)
    assert attrs.get("data-errors") not in (None, "0"), attrs
    done, total = map(int, attrs["data-gallery"].split("/"))
    assert done == total - 1, attrs
