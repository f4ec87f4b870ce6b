"""train_pretrain.py on the GPU (run on the device machine: pytest -m gpu tests/test_pretrain_gpu.py)."""
import pytest
import torch

from test_pretrain import TINY, epoch_lines, train, val_losses

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")]


def test_cuda_graph_trains_as_eager(shakespeare, tmp_path):
    """--cuda_graph=True (forward + backward replayed from one CUDA graph) gives the eager run's losses, with 2
    micro-steps per step: a replay on stale inputs or a graph that overwrote instead of adding gradients would
    drift by far more than 5e-4 in 8 steps (the kernel's atomics make the two runs differ only in rounding)."""
    args = [f"--data_dir={shakespeare}", *TINY, "--device=cuda", "--max_iters=8", "--gradient_accumulation_steps=2",
            "--epoch_samples=16", "--eval_interval=8"]
    eager = train(*args, f"--out_dir={tmp_path / 'eager'}")
    graph = train(*args, f"--out_dir={tmp_path / 'graph'}", "--cuda_graph=True")
    assert "captured one micro-step" in graph.stdout and "captured" not in eager.stdout
    a, b = epoch_lines(tmp_path / "eager"), epoch_lines(tmp_path / "graph")
    assert len(a) == len(b) == 8
    for (_, loss_a, _), (_, loss_b, _) in zip(a, b):
        assert abs(float(loss_a) - float(loss_b)) <= 5e-4, (a, b)
    assert float(a[-1][1]) < float(a[0][1]) - 0.2  # it trains
    val_a, val_b = val_losses(eager.stdout), val_losses(graph.stdout)
    assert val_a.keys() == val_b.keys() == {0, 8} and abs(val_a[8] - val_b[8]) <= 5e-4
