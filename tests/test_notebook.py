"""notebooks/quickstart.ipynb runs top to bottom (its asserts included) on the default model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell["outputs"] and cell["execution_count"] is None, "strip outputs before committing"


@pytest.mark.slow
def test_notebook_runs(smollm2_path, tmp_path):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    # a kernel of this very interpreter (the venv), whatever kernels the machine has registered
    spec_dir = tmp_path / "kernels" / "jaxllm-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxllm test", "language": "python",
        "env": {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TOKENIZERS_PARALLELISM": "false"},
    }))
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="jaxllm-test",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    client = NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Paris" in texts
