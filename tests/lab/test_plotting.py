"""The lab's plots leave the process's matplotlib backend alone."""
from __future__ import annotations

import subprocess
import sys
import textwrap


def test_importing_the_lab_keeps_the_callers_backend_and_still_writes_pngs(tmp_path):
    # A fresh interpreter: the backend is process state, and the test process may have set it already.
    code = textwrap.dedent(f"""
        import importlib
        import matplotlib
        matplotlib.use("svg")
        from normlab.lab import plotting
        from normlab.lab.experiments import REGISTRY
        for module in REGISTRY.values():
            importlib.import_module(module)
        fig, ax = plotting.figure()
        ax.plot([0, 1], [1, 0], color=plotting.cmap("viridis")(0.5))
        plotting.save(fig, {str(tmp_path / "line.png")!r})
        fig, axes = plotting.subplots(2, 3, squeeze=False)
        assert axes.shape == (2, 3)
        import matplotlib.pyplot as plt
        assert plt.get_fignums() == [], plt.get_fignums()  # nothing registered with pyplot, nothing to leak
        print(matplotlib.get_backend())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "svg"
    assert (tmp_path / "line.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
