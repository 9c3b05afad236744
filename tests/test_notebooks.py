"""Every notebook runs top to bottom without error (executed with nbclient), and shows what it claims."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def execute(name: str) -> list[str]:
    """Run a notebook; return the text output of each code cell."""
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outs = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert not [o for o in cell.outputs if o.output_type == "error"]
        outs.append("".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.outputs))
    return outs


def test_all_notebooks_are_tested():
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == {"quickstart.ipynb", "explore_layers.ipynb", "scoring.ipynb"}


def test_quickstart(default_gguf):
    outs = execute("quickstart.ipynb")
    assert outs[3].count("p=") == 5  # the top-5 cell printed five candidates


def test_explore_layers(default_gguf):
    outs = execute("explore_layers.ipynb")
    assert "no NaN/Inf" in outs[2]  # the recorder's repr
    assert "layer 11: |max|" in outs[5]
    assert "first divergence: ffn_swiglu at layer 0" in outs[-1]


def test_scoring(default_gguf):
    outs = execute("scoring.ipynb")
    assert "tokens" in outs[0] and "PPL = " in outs[1] and "1 compilation(s)" in outs[1]
    assert outs[2].count("bits") == 5  # the five tokens where Q4_1 and F32 disagree most
    assert "mean KLD" in outs[3] and "same top token" in outs[3]
