"""The issue's bar: an RL loop written against the Tinker SDK alone (examples/tinker_rl_loop.py),
4 training clients of ranks 1, 4, 16, 64 at once on the tiny model, raises held-out greedy
accuracy for each. Slow: minutes on a 2-core CPU."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("tinker")
pytest.importorskip("fastapi")
pytest.importorskip("reasoning_gym")

from test_server import KEY, running  # noqa: E402


@pytest.mark.slow
def test_tinker_rl_loop_raises_accuracy_for_four_clients(tmp_path, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    sys.modules.pop("tinker_rl_loop", None)
    import tinker_rl_loop
    with running("tiny", tmp_path) as server:
        monkeypatch.setenv("TINKER_BASE_URL", server.url)
        monkeypatch.setenv("TINKER_API_KEY", KEY)
        results = tinker_rl_loop.main(["--steps", "15", "--eval", "100"])
        stats = server.server.stats()
    assert set(results) == {1, 4, 16, 64}
    for rank, r in results.items():
        assert r["after"] > r["before"] + 0.05, (rank, r)
    assert stats["queue"]["max_models_per_batch"] >= 2, "the clients' forward_backward calls shared base passes"
