"""Shared test settings.

Tests find real data (tinyshakespeare, the World vocab, LAMBADA, the SmolLM2 GGUF, ...) through one setting:
the environment variable RWKV7_DATA_DIR. CI points it at the project's data folder; point it at your own copy.
A test that needs data fails (it does not skip) when the variable is missing, so CI can never pass silently.
GPU tests carry the `gpu` marker; CI on a CPU machine deselects them with -m "not gpu".
"""
import os
import pytest


@pytest.fixture(scope="session")
def data_dir():
    d = os.environ.get("RWKV7_DATA_DIR")
    if not d or not os.path.isdir(d):
        pytest.fail("set RWKV7_DATA_DIR to the data folder (tinyshakespeare/, rwkv/, gsm8k/, ...)")
    return d


@pytest.fixture(scope="session")
def vocab(data_dir):
    return os.path.join(data_dir, "rwkv", "rwkv_vocab_v20230424.txt")


@pytest.fixture(scope="session")
def world(vocab):
    from data.tokenizers import get_tokenizer
    return get_tokenizer("world:" + vocab)


@pytest.fixture(scope="session")
def shakespeare(data_dir, tmp_path_factory):
    """tinyshakespeare prepared by data/shakespeare_char/prepare.py (train/val binidx + meta.json)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path_factory.mktemp("shakespeare_char"))
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py",
                    os.path.join(data_dir, "tinyshakespeare", "input.txt"), f"--out={out}"],
                   cwd=root, check=True, capture_output=True)
    return out


def pytest_sessionfinish(session, exitstatus):
    """Under CI a skipped test is a failure: CPU tests must run, GPU tests are deselected with -m "not gpu"."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if os.environ.get("CI") and skipped:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped, and a skip does not count as a pass here:", red=True)
        for report in skipped:
            reporter.write_line(f"  {report.nodeid}")
        session.exitstatus = 1
