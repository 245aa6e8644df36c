"""The threading policy: spinning or sleeping pool threads, chosen from the machine or set."""

from __future__ import annotations

import pytest
from runtime_artifacts import build

from edgeft.runtime import session
from edgeft.runtime.session import Cores, choose_spin, resolve_spin
from edgeft.runtime.params import Spin
from edgeft.serve_config import ServeConfig


@pytest.mark.parametrize("cores, threads, reserve, spins", [
    (Cores(2, 0.0), 2, 0, True),  # an idle 2-core machine: both cores are the pool's
    (Cores(2, 0.1), 2, 0, True),  # a little noise in the sample
    (Cores(2, 1.0), 2, 0, False),  # a busy loop on one core
    (Cores(2, 1.0), 1, 0, True),  # ... leaves one core: a one-thread pool may spin
    (Cores(2, 0.0), 2, 1, False),  # a core kept for other work (another model's thread)
    (Cores(8, 2.0), 4, 1, True),
    (Cores(1.5, 0.0), 2, 0, False),  # a cgroup quota of 1.5 CPUs
])
def test_spin_only_on_idle_cores(cores, threads, reserve, spins):
    assert choose_spin(threads, reserve, cores)[0] is spins


def test_the_reason_names_the_slack_that_lets_a_pool_just_short_of_its_cores_spin():
    spin, why = choose_spin(2, 0.1, Cores(2, 0.0))  # 2.0 idle, 2.1 needed: inside the slack
    assert spin and why == "2.0 of 2 usable cores idle, 2.1 needed (2 threads + 0.1 reserved, 0.25 core of slack)"
    assert not choose_spin(2, 0.3, Cores(2, 0.0))[0]  # 2.3 needed: past it


def test_explicit_setting_else_machine_and_the_library_reads_no_environment(monkeypatch):
    monkeypatch.setattr(session, "machine_cores", lambda: Cores(2, 2.0))
    monkeypatch.setenv("EDGEFT_SPIN", "1")  # read by the commands' --spin, not by the library
    monkeypatch.setenv("EDGEFT_THREADS", "7")
    assert resolve_spin(None, 2)[0] is False  # auto on a busy machine
    assert resolve_spin(Spin.auto, 2)[0] is False
    assert resolve_spin(Spin.on, 2) == (True, "--spin on")
    assert resolve_spin(False, 2)[0] is False
    assert session.default_threads() != 7


@pytest.mark.parametrize("command", ["generate", "chat", "classify", "embed", "bench", "serve"])
def test_edgeft_spin_and_threads_reach_the_commands_config(command, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import edgeft.cli.options as O
    from edgeft.cli import app

    seen: list = []
    monkeypatch.setattr(O, "_run", lambda fn, kwargs: seen.append(kwargs.get("config")))
    args = [command, str(tmp_path), *(["hi"] if command in ("classify", "embed") else [])]
    for value, want in (("1", Spin.on), ("0", Spin.off), ("auto", Spin.auto), ("on", Spin.on)):
        res = CliRunner().invoke(app, args, env={"EDGEFT_SPIN": value, "EDGEFT_THREADS": "3"})
        assert res.exit_code == 0, res.output
        assert seen[-1].spin is want
        if command != "bench":
            assert seen[-1].threads == 3
    assert CliRunner().invoke(app, [*args, "--spin", "off"], env={"EDGEFT_SPIN": "1"}).exit_code == 0
    assert seen[-1].spin is Spin.off  # the flag wins over the variable
    res = CliRunner().invoke(app, args, env={"EDGEFT_SPIN": "sometimes"})
    assert res.exit_code == 2 and "EDGEFT_SPIN" in res.output and "Traceback" not in res.output


def test_busy_cores_exclude_our_own_work(monkeypatch):
    """Two CPUs sampled: one fully busy, one half busy, of which our own process used half a core."""
    reads = iter([[(1000, 500), (1000, 500)], [(1100, 500), (1100, 550)]])
    own = iter([10.0, 10.05])
    monkeypatch.setattr(session, "_affinity", lambda: [0, 1])
    monkeypatch.setattr(session, "_cgroup_quota", lambda: None)
    monkeypatch.setattr(session, "_cpu_times", lambda cpus: next(reads))
    monkeypatch.setattr(session, "_own_cpu_s", lambda: next(own))
    clock = iter([0.0, 0.1])
    monkeypatch.setattr(session.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(session.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    session._READ.clear()
    cores = session.machine_cores(sample_s=0, max_age_s=0)
    session._READ.clear()
    assert cores.usable == 2 and cores.busy == pytest.approx(1.0)  # 1.5 busy - 0.5 ours


def test_a_minute_of_oversubscription_counts_as_busy(monkeypatch):
    monkeypatch.setattr(session, "_cpu_times", lambda cpus: None)  # no /proc/stat
    monkeypatch.setattr(session, "_affinity", lambda: [0, 1])
    monkeypatch.setattr(session, "_cgroup_quota", lambda: None)
    monkeypatch.setattr(session.os, "getloadavg", lambda: (11.0, 7.0, 3.0))
    session._READ.clear()
    assert session.machine_cores(sample_s=0, max_age_s=0).spare() == 0
    session._READ.clear()


def test_cgroup_quota(tmp_path):
    assert session._cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert session._cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert session._cgroup_quota(tmp_path) is None


def test_the_choice_reaches_the_session(tiny_llama_dir, tmp_path_factory, monkeypatch):
    from edgeft.runtime import load

    art = build("llama", str(tiny_llama_dir), str(tmp_path_factory.getbasetemp() / "runtime-artifacts"))
    for policy, want in ((Spin.on, "1"), (Spin.off, "0")):
        gen = load(art, threads=1, spin=policy)
        opts = gen.engine.session.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == want
        assert gen.spinning is (want == "1")
    monkeypatch.setattr(session, "machine_cores", lambda: Cores(2, 2.0))
    assert load(art, threads=1).spinning is False


def test_serve_reserves_the_other_models_and_the_event_loop(tmp_path):
    from edgeft.runtime.serve.state import _spin_reserve

    one = ServeConfig(artifacts=(tmp_path,), threads=2, parallel=1)
    assert _spin_reserve(one, others=0) == 0
    several = _spin_reserve(ServeConfig(artifacts=(tmp_path,), threads=2, parallel=4), others=0)
    assert 0 < several < 0.25  # a fraction of a core: the event loop streams chunks, the pool computes
    assert _spin_reserve(ServeConfig(artifacts=(tmp_path, tmp_path / "b"), threads=2, parallel=4), others=1) == 2 + several
    # an idle 2-core machine spins its 2 threads with several slots; with another model's 2 threads it sleeps
    idle = Cores(usable=2, busy=0)
    assert choose_spin(2, several, idle)[0] and not choose_spin(2, 2 + several, idle)[0]


def test_a_split_artifacts_parts_sleep_unless_told_to_spin():
    """Its trunk and top take turns on every call: auto sleeps; an explicit setting stands."""
    from edgeft.runtime.session import SPLIT_SLEEPS

    idle = Cores(usable=64.0, busy=0.0)
    assert choose_spin(2, cores=idle)[0]  # a whole-graph session on idle cores would spin
    assert resolve_spin(None, 2, split=True) == (False, SPLIT_SLEEPS)
    assert resolve_spin(Spin.auto, 2, split=True) == (False, SPLIT_SLEEPS)
    assert resolve_spin(Spin.on, 2, split=True)[0] is True
    assert resolve_spin(True, 2, split=True)[0] is True
