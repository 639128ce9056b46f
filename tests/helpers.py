"""Helpers several test folders share: comparing outputs, watching processes, the ViT-H/14 architecture."""

import time

import pyarrow.parquet as pq


def data_files(root):
    """{relative path: table} of the data files (no _ state), for comparing two runs."""
    return {str(p.relative_to(root)): pq.read_table(p) for p in sorted(root.rglob("*.parquet"))
            if not str(p.relative_to(root)).startswith("_")}


def assert_same(a, b):
    """Two outputs hold the same data files with equal tables."""
    left, right = data_files(a), data_files(b)
    assert sorted(left) == sorted(right) and left
    for name in left:
        assert left[name].equals(right[name]), name


def snapshot(root):
    """{relative path: bytes} of every file under ``root``: a run that changed nothing leaves it equal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for(predicate, process, seconds=300):
    """Until ``predicate()`` holds, failing with the process's stderr if it ends first."""
    deadline = time.time() + seconds
    while time.time() < deadline and not predicate():
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.1)
    assert predicate()


def process_state(pid: int) -> str:
    """The letter /proc gives a process's state: "T" when stopped."""
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


def stopped(process):
    """Until ``process`` is stopped (SIGSTOP, or --stop-before in tests/faults.py)."""
    wait_for(lambda: process_state(process.pid) == "T", process, seconds=300)


def h14_module():
    """A fresh module of clip-retrieval's H14_NSFW_Detector architecture (same Sequential, same key names)."""
    from torch import nn

    class H14(nn.Module):
        def __init__(self):
            super().__init__()
            blocks = []
            for a, b in ((1024, 1024), (1024, 2048), (2048, 1024), (1024, 256), (256, 128)):
                blocks += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.2)]
            self.layers = nn.Sequential(*blocks, nn.Linear(128, 16), nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    return H14()
