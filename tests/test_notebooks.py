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
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == {"quickstart.ipynb", "explore_layers.ipynb", "scoring.ipynb",
                                                              "circuits.ipynb"}


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


def test_circuits(default_gguf):
    """The story the notebook tells holds: ' Paris' tops the lens only at the last layer, the head
    with the largest direct logit attribution is also the one whose patching restores the most,
    and it attends from the last token to the country."""
    outs = execute("circuits.ipynb")
    lens = [line for line in outs[1].splitlines() if line.startswith("layer ")]
    assert "top ' Paris'" in lens[-1] and "rank 0" in lens[-1]
    assert all("top ' Paris'" not in line for line in lens[:-1])
    best_dla = outs[2].splitlines()[0].split(":")[0]  # e.g. "L23H4"
    assert f"heads that restore the most: ['{best_dla} " in outs[4]
    france = float(outs[2].split("' France': ")[1].split(",")[0])
    assert france > 0.5
    assert "at the last token from layer" in outs[3]
    assert float(outs[5].split("rank correlation ")[1].split()[0]) > 0.5  # attribution ranks cells as patching does

    def odds(text: str) -> list[float]:  # the steered logit differences at strengths -6, 0, +6
        return [float(line.split(" = ")[1].split()[0]) for line in text.splitlines() if " = " in line]

    ours, theirs = odds(outs[6]), odds(outs[7])
    assert len(ours) == len(theirs) == 3
    assert ours[0] < ours[1] < ours[2] and theirs[0] < theirs[1] < theirs[2]  # llama.cpp moves the same way
