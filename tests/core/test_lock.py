"""One writer per project: the lock, read-only sessions, and two real processes."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pandas as pd
import pytest

from napari_hemofm.core.cells import CellTable
from napari_hemofm.core.io import close_project, load_project
from napari_hemofm.core.journal import ProjectReadOnlyError, journal_path
from napari_hemofm.core.lock import (
    ProjectLock,
    ProjectLockedError,
    lock_path,
    pid_alive,
    read_lock,
)
from napari_hemofm.core.review import Review

N_CELLS = 40


def make_project(path, n=N_CELLS, *, embeddings=False, seed=0):
    """A saved project of ``n`` cells; its table holds no lock afterwards."""
    frame = pd.DataFrame(
        {"source": "s.png", "batch": "lab", "x": 1.0, "y": 1.0}
        | {"x0": 0, "y0": 0, "x1": 8, "y1": 8},
        index=[f"lab/s.png#{k}" for k in range(n)],
    )
    table = CellTable()
    emb = np.random.default_rng(seed).normal(size=(n, 8)) if embeddings else None
    table.add_cells(frame, embeddings=emb)
    table.save(path)
    return table


def run_py(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


HOLDER = """
import sys, time
from napari_hemofm.core.review import Review
review = Review.open(sys.argv[1])
print("open", flush=True)
sys.stdin.readline()            # hold the project until told to go
review.relabel(["lab/s.png#7"], "monocyte")
print("labelled", flush=True)
review.save()
review.close()
print("closed", flush=True)
"""


def test_the_lock_names_its_holder_and_goes_with_close(tmp_path):
    """Opening for writing writes <name>.lock (user, host, pid, time) and closing removes it."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    review = Review.open(path)
    info = json.loads(lock_path(path).read_text())
    assert {"user", "host", "pid", "time"} <= set(info)
    assert info["pid"] == os.getpid()
    assert info["host"] == socket.gethostname()
    review.close()
    assert not lock_path(path).exists()


def test_a_second_process_gets_one_clear_error_or_a_read_only_session(tmp_path):
    """While one process holds the project, another's Review.open raises
    ProjectLockedError naming user@host (pid); read_only=True opens it, shows the
    holder's labels, and refuses relabel, undo and save with a clear error."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    holder = run_py(HOLDER, str(path), stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(ProjectLockedError, match=rf"pid {holder.pid}\)") as info:
            Review.open(path)
        assert info.value.holder.pid == holder.pid
        assert "\n" not in str(info.value)
        ro = Review.open(path, read_only=True)
        assert ro.read_only
        with pytest.raises(ProjectReadOnlyError, match="read-only"):
            ro.relabel(["lab/s.png#1"], "basophil")
        with pytest.raises(ProjectReadOnlyError):
            ro.save()
        assert pd.isna(ro.table.column("label").loc["lab/s.png#1"])
        ro.close()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "labelled"
        assert holder.stdout.readline().strip() == "closed"
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert holder.returncode == 0, holder.stderr.read()
    review = Review.open(path)  # free again
    assert review.table.column("label").loc["lab/s.png#7"] == "monocyte"
    review.close()


def test_a_dead_processes_lock_is_taken_over(tmp_path):
    """A lock left by a process that no longer runs (same host) does not block."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    pid = dead_pid()
    assert not pid_alive(pid)
    stale = {"user": "x", "host": socket.gethostname(), "pid": pid, "time": "t"}
    lock_path(path).write_text(json.dumps(stale))
    table = load_project(path)
    assert read_lock(path).pid == os.getpid()
    table.close()


def test_a_lock_from_another_host_is_respected(tmp_path):
    """A lock held on another machine cannot be checked: it is not taken over, and the
    message says how to clear it if that process is gone."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    other = {"user": "ana", "host": "lab-pc-7", "pid": 1234, "time": "2026-01-01T00:00:00"}
    lock_path(path).write_text(json.dumps(other))
    with pytest.raises(ProjectLockedError, match=r"ana@lab-pc-7 \(pid 1234\).*delete p\.lock"):
        load_project(path)
    assert json.loads(lock_path(path).read_text()) == other


def test_a_lock_is_released_at_exit_without_close(tmp_path):
    """A process that exits without closing its project leaves no lock behind (atexit)."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    proc = run_py(
        "import sys; from napari_hemofm.core.io import load_project; "
        "t = load_project(sys.argv[1]); t.set_labels(['lab/s.png#3'], 'eosinophil')",
        str(path),
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not lock_path(path).exists()
    assert load_project(path, mode="r").column("label").loc["lab/s.png#3"] == "eosinophil"


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    """Two opens in one process share the lock; the file goes with the last release."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    a = ProjectLock.acquire(path)
    b = ProjectLock.acquire(path)
    a.release()
    assert lock_path(path).exists()
    b.release()
    assert not lock_path(path).exists()


def test_an_unlocked_table_cannot_write_while_another_process_holds_the_project(tmp_path):
    """A table saved without opening (it holds no lock) takes the lock for each label
    write and save: while another process has the project open, both are refused, so
    that process's save cannot drop them."""
    path = tmp_path / "p.h5ad"
    table = make_project(path)
    holder = run_py(HOLDER, str(path), stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(ProjectLockedError):
            table.set_labels(["lab/s.png#2"], "basophil")
        with pytest.raises(ProjectLockedError):
            table.save(path)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "labelled"
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert holder.returncode == 0


WRITER = """
import sys
from napari_hemofm.core.io import load_project
path, first, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for r in range(rounds):
    table = load_project(path, wait=60)        # waits while the other process writes
    for k in range(first, first + 5):
        label = f"w{first}r{r}"
        table.set_labels([f"lab/s.png#{k}"], label)
        print(f"lab/s.png#{k}", label, flush=True)   # acknowledged
    table.save(path)
    table.close()
"""


def test_two_writer_processes_lose_no_acknowledged_label(tmp_path):
    """Two processes open, label, save and close one project in turns, as fast as they
    can: each cell ends with the last label its writer acknowledged (without the lock,
    one process's save would drop the other's journal)."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    procs = [run_py(WRITER, str(path), str(first), "4") for first in (0, 20)]
    acked: dict[str, str] = {}
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        acked.update(line.split() for line in out.splitlines())
    assert len(acked) == 10
    labels = load_project(path, mode="r").column("label")
    for cid, label in acked.items():
        assert labels.loc[cid] == label, (cid, label, labels.loc[cid])


def test_umap_refuses_a_locked_project_in_one_line_or_waits(tmp_path):
    """`hemofm umap` on a project open elsewhere exits 1 with one line naming the holder;
    with --wait it runs once the holder closes, and the holder's labels survive."""
    path = tmp_path / "p.h5ad"
    make_project(path, n=60, embeddings=True)
    review = Review.open(path)
    cmd = [sys.executable, "-m", "napari_hemofm.cli", "umap", str(path)]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "is open for writing by" in lines[0]
    assert f"(pid {os.getpid()})" in lines[0]

    waiter = subprocess.Popen(
        [*cmd, "--wait", "120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1.0)
    review.relabel(["lab/s.png#5"], "neutrophil")  # acknowledged by the holder
    review.close()  # unsaved: the label lives in the journal
    _, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    back = load_project(path, mode="r")
    assert back.column("label").loc["lab/s.png#5"] == "neutrophil"
    assert back.adata.obsm["X_umap"].shape == (60, 2)


def test_wait_gives_up_with_the_holder_named(tmp_path):
    """load_project(wait=s) retries for s seconds, then raises naming the holder."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    holder = run_py(HOLDER, str(path), stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "open"
        start = time.monotonic()
        with pytest.raises(ProjectLockedError, match=str(holder.pid)):
            load_project(path, wait=0.6)
        assert time.monotonic() - start >= 0.6
    finally:
        holder.stdin.close()
        holder.wait(30)


def test_concurrent_takeovers_of_a_stale_lock_leave_one_holder(tmp_path):
    """Threads racing to take over one stale lock: exactly one acquires it."""
    path = tmp_path / "p.h5ad"
    make_project(path)
    stale = {"user": "x", "host": socket.gethostname(), "pid": dead_pid(), "time": "t"}
    lock_path(path).write_text(json.dumps(stale))
    results = []
    barrier = threading.Barrier(4)

    def grab():
        lock = ProjectLock(path)
        barrier.wait()
        results.append(lock._try_create() is None)

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 1
    os.unlink(lock_path(path))


def test_a_save_over_a_newer_file_is_refused_and_loses_nothing(tmp_path):
    """Two tables of one project in one process (they share the lock): after one saves,
    the other's save is refused (ProjectChangedError) instead of overwriting it, and the
    labels both acknowledged come back on reopening."""
    from napari_hemofm.core.io import ProjectChangedError

    path = tmp_path / "p.h5ad"
    make_project(path)
    first, second = load_project(path), load_project(path)
    first.set_labels(["lab/s.png#1"], "monocyte")
    first.save(path)
    second.set_labels(["lab/s.png#2"], "basophil")
    with pytest.raises(ProjectChangedError, match="reopen it"):
        second.save(path)
    first.close()
    second.close()
    back = load_project(path, mode="r").column("label")
    assert back.loc["lab/s.png#1"] == "monocyte"
    assert back.loc["lab/s.png#2"] == "basophil"


def test_a_project_opened_through_a_link_keeps_lock_and_journal_beside_the_real_file(tmp_path):
    """Opened through a symbolic link (another name, another folder), the project's lock
    and journal sit beside the real file, where the data is written; a save through the
    link writes the real file and leaves the link a link; the labels journalled through
    one name come back through the other."""
    real_dir, link_dir = tmp_path / "real", tmp_path / "links"
    real_dir.mkdir()
    link_dir.mkdir()
    real = real_dir / "p.h5ad"
    make_project(real).close()
    link = link_dir / "view.h5ad"
    link.symlink_to(real)
    assert lock_path(link) == lock_path(real) == real_dir / "p.lock"
    assert journal_path(link) == journal_path(real) == real_dir / "p.labels.jsonl"

    table = load_project(link)
    try:
        assert (real_dir / "p.lock").is_file()
        assert read_lock(real) is not None
        assert not (link_dir / "view.lock").exists()
        table.set_labels([table.cell_ids[0]], "monocyte")
        assert (real_dir / "p.labels.jsonl").stat().st_size > 0
        assert not (link_dir / "view.labels.jsonl").exists()
    finally:
        close_project(table)
    assert read_lock(real) is None

    again = load_project(real)  # the other name replays the same journal
    try:
        assert again.obs["label"].iloc[0] == "monocyte"
        again.set_labels([again.cell_ids[1]], "basophil")
        again.save(link)  # saving through the link writes the real file
    finally:
        close_project(again)
    assert link.is_symlink()
    assert sorted(p.name for p in link_dir.iterdir()) == ["view.h5ad"]
    last = load_project(real, mode="r")
    assert list(last.obs["label"].iloc[:2]) == ["monocyte", "basophil"]
