"""Empty or degenerate results are refused (or warned about, where a user may want them) in one line."""

from __future__ import annotations

import numpy as np
import pandas as pd

from protloc.cli import main
from protloc.data.io import write_table, write_tiff


def test_prepare_that_cuts_no_crop_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(2):  # a blank nucleus channel: nothing to centre a crop on
        img = np.zeros((2, 256, 256), np.uint16)
        img[1] = rng.integers(0, 3000, (256, 256))
        write_tiff(tmp_path / f"f{i}.tif", img)
    fovs = pd.DataFrame({"fov_id": ["a", "b"], "protein_id": ["P", "Q"], "path": ["f0.tif", "f1.tif"]})
    write_table(fovs, tmp_path / "fovs.csv")
    (tmp_path / "seq.fasta").write_text(">P\nMKTAYIAKQ\n>Q\nMKTAYIAKQ\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["prepare", "--fovs", str(tmp_path / "fovs.csv"), "--sequences", str(tmp_path / "seq.fasta")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("protloc: error:")]
    assert len(errors) == 1 and err[-1] == errors[0]  # warnings may come first, one error line last
    assert "fovs.csv: no crop was cut from any of the 2 fields of view (0 nuclei found)" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no empty stores, no .partial, no .tmp


def test_a_sequence_without_a_known_residue_is_predicted_with_a_warning(tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["predict", "--sequence", "XXXXXXXXXX", "--out", str(out), "--samples", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("sequence 'query' has no standard residue (only X)") == 1
    assert (out / "summary.json").is_file()
