"""Claim files (benchmarks/claims.py): one holder per pair, stale claims of gone processes taken over exactly once."""
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace

from benchmarks.claims import HOST, Holder, _proc_start, new_holder, read_claim, release, try_claim


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write(path, holder: Holder) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(holder)))


def test_one_holder_and_only_the_holder_releases(tmp_path):
    claim = tmp_path / "m" / "t" / "k.claim"
    me = new_holder()
    assert try_claim(claim, me) == (True, None)
    assert try_claim(claim, me) == (True, None)  # a sweep asking again for its own pair
    release(claim, me)
    assert not claim.exists()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live sweep process on this host holds it
        live = Holder(HOST, other.pid, _proc_start(other.pid), "theirs", "2026-01-01T00:00:00Z")
        _write(claim, live)
        assert try_claim(claim, me) == (False, live)
        release(claim, me)
        assert read_claim(claim) == live
    finally:
        other.kill()
        other.wait()
    assert try_claim(claim, me) == (True, live)  # its process is gone now: stale


def test_stale_claims_are_taken_over_and_other_hosts_are_left_alone(tmp_path):
    me = new_holder()
    dead = Holder(HOST, _dead_pid(), None, "gone", "2026-01-01T00:00:00Z")
    _write(tmp_path / "dead.claim", dead)
    assert try_claim(tmp_path / "dead.claim", me) == (True, dead)
    assert read_claim(tmp_path / "dead.claim") == me

    reused = replace(me, token="earlier", proc_start="1")  # a live pid that now belongs to another process
    _write(tmp_path / "reused.claim", reused)
    assert try_claim(tmp_path / "reused.claim", me) == (True, reused)

    foreign = Holder("another-node", 1, None, "theirs", "2026-01-01T00:00:00Z")
    _write(tmp_path / "foreign.claim", foreign)
    assert try_claim(tmp_path / "foreign.claim", me) == (False, foreign)
    assert read_claim(tmp_path / "foreign.claim") == foreign

    (tmp_path / "half.claim").write_text("")  # its writer died between create and write
    assert try_claim(tmp_path / "half.claim", me) == (False, "unreadable")


RACE = r"""
import sys, time
from pathlib import Path
from benchmarks.claims import new_holder, try_claim
go = Path(sys.argv[2])
Path(sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.005)
ok, prev = try_claim(Path(sys.argv[1]), new_holder())
print(int(ok), prev is not None)
"""


def test_processes_racing_for_one_stale_claim_take_it_exactly_once(tmp_path):
    claim = tmp_path / "k.claim"
    _write(claim, Holder(HOST, _dead_pid(), None, "gone", "2026-01-01T00:00:00Z"))
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(claim), str(go), str(tmp_path / f"ready{i}")],
                              stdout=subprocess.PIPE, text=True) for i in range(4)]
    deadline = time.time() + 15
    while len(list(tmp_path.glob("ready*"))) < 4 and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=15)[0].split() for p in procs]
    assert sorted(r[0] for r in results) == ["0", "0", "0", "1"]
    winner = [r for r in results if r[0] == "1"][0]
    assert winner[1] == "True"  # the one that won reports the takeover
    assert not (tmp_path / "k.claim.takeover").exists()
