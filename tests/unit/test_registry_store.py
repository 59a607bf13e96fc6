"""The registry store, the same suite on SQLite (WAL) and on a real PostgreSQL server."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from gateway.errors import AdapterNotFound, InvalidRequest, PreconditionFailed
from gateway.registry.records import NewVersion
from gateway.registry.schema import SCHEMA_VERSION
from gateway.registry.store import RegistryStore
from gateway.registry.validate import AdapterFacts

FACTS = AdapterFacts(8, 16.0, ("q_proj", "v_proj"), 1234, "base-v1:abc", "fingerprint", {})


def new(sha: str, **fields: object) -> NewVersion:
    return NewVersion(facts=FACTS, sha256=sha * 64, source="test", metadata={}, **fields)


@pytest.fixture
def store(registry_url):
    store = RegistryStore(registry_url)
    yield store
    store.close()


def test_versions_are_numbered_per_adapter_and_never_reused(store):
    assert store.add_version("acme", new("a"), "alice").number == 1
    assert store.add_version("acme", new("b"), "alice").number == 2
    assert store.add_version("other", new("c"), "bob").number == 1
    store.delete_version("acme", 2, "alice", "bad", in_flight=lambda: 0)
    assert store.add_version("acme", new("d"), "alice").number == 3
    assert [v.number for v in store.get_adapter("acme").versions] == [1, 3]
    with pytest.raises(AdapterNotFound, match="acme@v2"):
        store.set_alias("acme", "candidate", 2, "alice")


def test_registration_records_facts_metadata_and_audit(store):
    version = store.add_version(
        "acme",
        new("a", description="support bot", owner="team-a", alias="candidate"),
        "alice",
    )
    assert version.aliases == ("candidate",)
    adapter = store.get_adapter("acme")
    assert (adapter.description, adapter.owner, adapter.aliases) == (
        "support bot",
        "team-a",
        {"candidate": 1},
    )
    stored = adapter.versions[0]
    assert (stored.rank, stored.alpha, stored.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert (stored.sha256, stored.size_bytes, stored.base_rule) == ("a" * 64, 1234, "fingerprint")
    assert stored.actor == "alice" and stored.created_at.tzinfo is not None
    actions = [(e.action, e.version) for e in store.audit_events("acme")]
    assert actions == [("set_alias", 1), ("register", 1)]


@pytest.mark.parametrize(
    ("name", "alias"), [("Bad Name", ""), ("a@b", ""), ("ok", "v2"), ("ok", "production")]
)
def test_bad_names_and_aliases_are_refused_and_nothing_is_written(store, name, alias):
    before = store.generation()
    with pytest.raises(InvalidRequest):
        store.add_version(name, new("a", alias=alias), "alice")
    assert store.generation() == before
    assert store.list_adapters(10) == []


def test_production_needs_a_passing_evaluation_unless_forced(store):
    store.add_version("acme", new("a"), "alice")
    with pytest.raises(PreconditionFailed, match="no evaluation"):
        store.set_alias("acme", "production", 1, "alice")
    with pytest.raises(InvalidRequest, match="reason"):
        store.set_alias("acme", "production", 1, "alice", force=True)
    move = store.set_alias("acme", "production", 1, "alice", force=True, reason="hotfix")
    assert move.forced and move.reason == "hotfix" and move.from_version == 0
    store.add_version("acme", new("b"), "alice")
    store.record_evaluation("acme", 2, "gate", "fail", {"score": 0.1}, "ci")
    with pytest.raises(PreconditionFailed, match="latest evaluation failed"):
        store.set_alias("acme", "production", 2, "alice")
    store.record_evaluation("acme", 2, "gate", "pass", {"score": 0.9}, "ci")
    store.set_alias("acme", "production", 2, "ci", expected=1, reason="won the gate")
    # a rollback is a move like any other: v1 has no passing evaluation, so it needs force
    with pytest.raises(PreconditionFailed, match="no evaluation"):
        store.set_alias("acme", "production", 1, "alice", expected=2, reason="rollback")
    back = store.set_alias("acme", "production", 1, "alice", expected=2, reason="rb", force=True)
    assert (back.from_version, back.to_version, back.forced) == (2, 1, True)
    assert store.get_adapter("acme").aliases == {"production": 1}
    # a version whose latest evaluation failed cannot return without force
    store.record_evaluation("acme", 2, "regression", "fail", {}, "ci")
    with pytest.raises(PreconditionFailed, match="latest evaluation failed"):
        store.set_alias("acme", "production", 2, "alice", expected=1)


def test_failed_moves_leave_the_alias_and_history_alone(store):
    store.add_version("acme", new("a"), "alice")
    store.add_version("acme", new("b"), "alice")
    store.set_alias("acme", "candidate", 1, "alice", expected=0)
    before = (store.alias_history("acme"), store.generation())
    with pytest.raises(PreconditionFailed, match="holds v1, not v2"):
        store.set_alias("acme", "candidate", 2, "alice", expected=2)
    with pytest.raises(PreconditionFailed, match="holds v1, not no version"):
        store.set_alias("acme", "candidate", 2, "alice", expected=0)
    assert (store.alias_history("acme"), store.generation()) == before
    assert store.get_adapter("acme").aliases == {"candidate": 1}


def test_twenty_concurrent_compare_and_swaps_exactly_one_wins(store):
    store.add_version("acme", new("a"), "alice")
    store.add_version("acme", new("b"), "alice")
    store.set_alias("acme", "candidate", 1, "alice")
    results: list[object] = []
    barrier = threading.Barrier(20)

    def move(i: int) -> None:
        barrier.wait()
        try:
            results.append(store.set_alias("acme", "candidate", 2, f"w{i}", expected=1))
        except PreconditionFailed as exc:
            results.append(exc)

    threads = [threading.Thread(target=move, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wins = [r for r in results if not isinstance(r, Exception)]
    assert len(results) == 20 and len(wins) == 1
    history = store.alias_history("acme", "candidate")
    assert [(m.from_version, m.to_version) for m in history] == [(1, 2), (0, 1)]
    assert history[0].actor == wins[0].actor  # type: ignore[attr-defined]
    set_alias_events = [e for e in store.audit_events("acme") if e.action == "set_alias"]
    assert len(set_alias_events) == 2


def test_concurrent_first_registrations_of_one_name_get_distinct_numbers(store):
    numbers: list[int] = []
    barrier = threading.Barrier(8)

    def register(i: int) -> None:
        barrier.wait()
        numbers.append(store.add_version("fresh", new("abcdefgh"[i]), f"w{i}").number)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(numbers) == list(range(1, 9))


def test_delete_is_refused_while_aliased_or_busy(store):
    store.add_version("acme", new("a"), "alice")
    store.add_version("acme", new("a"), "alice")  # same content: shares the artifact
    store.set_alias("acme", "candidate", 1, "alice")
    with pytest.raises(PreconditionFailed, match="candidate points to"):
        store.delete_version("acme", 1, "alice", "", in_flight=lambda: 0)
    with pytest.raises(PreconditionFailed, match="3 requests in flight"):
        store.delete_version("acme", 2, "alice", "", in_flight=lambda: 3)
    assert [v.number for v in store.get_adapter("acme").versions] == [1, 2]
    sha, shared = store.delete_version("acme", 2, "alice", "old", in_flight=lambda: 0)
    assert sha == "a" * 64 and shared  # v1 still uses the files
    assert store.referenced_digests() == {"a" * 64}


def test_snapshot_and_generation_follow_every_change(store):
    g0 = store.generation()
    store.add_version("acme", new("a"), "alice")
    store.set_alias("acme", "production", 1, "alice", force=True, reason="first")
    snapshot = store.snapshot()
    assert snapshot.generation == store.generation() == g0 + 2
    assert snapshot.versions == [("acme", 1, "a" * 64, 8, ("q_proj", "v_proj"))]
    assert snapshot.aliases == [("acme", "production", 1)]


def test_list_adapters_pages_in_name_order(store):
    for name in ["c", "a", "d", "b", "e"]:
        store.add_version(name, new("a"), "alice")
    first = store.list_adapters(2)
    second = store.list_adapters(2, first[-1].name)
    third = store.list_adapters(2, second[-1].name)
    assert [a.name for a in first + second + third] == ["a", "b", "c", "d", "e"]
    assert first[0].versions[0].metadata == {}  # list view: no metadata


def test_schema_is_created_once_and_a_newer_schema_is_refused(registry_url):
    RegistryStore(registry_url).close()
    again = RegistryStore(registry_url)  # opening an existing registry changes nothing
    with again.engine.begin() as conn:
        conn.execute(
            text("UPDATE registry_state SET schema_version = :v"), {"v": SCHEMA_VERSION + 1}
        )
    again.close()
    with pytest.raises(RuntimeError, match="newer than this loraplex"):
        RegistryStore(registry_url)


def test_an_error_verdict_is_kept_as_such_and_blocks_production(store):
    store.add_version("acme", new("a"), "alice")
    record = store.record_evaluation("acme", 1, "gate", "error", {"error": "timeout"}, "ci")
    assert record.verdict == "error"
    assert [e.verdict for e in store.get_adapter("acme").versions[0].evaluations] == ["error"]
    [event] = [e for e in store.audit_events("acme") if e.action == "record_evaluation"]
    assert event.details == {"suite": "gate", "verdict": "error"}
    with pytest.raises(PreconditionFailed, match="latest evaluation ended in error"):
        store.set_alias("acme", "production", 1, "alice")
    before = store.generation()
    with pytest.raises(InvalidRequest, match="'maybe' is not one of pass, fail, error"):
        store.record_evaluation("acme", 1, "gate", "maybe", {}, "ci")
    assert store.generation() == before


def _as_schema_v1(url: str) -> None:
    """Turn a fresh registry into what loraplex wrote with schema v1: evaluations.passed."""
    store = RegistryStore(url)
    with store.engine.begin() as conn:
        conn.execute(
            text("ALTER TABLE evaluations ADD COLUMN passed BOOLEAN NOT NULL DEFAULT FALSE")
        )
        conn.execute(text("UPDATE evaluations SET passed = (verdict = 'pass')"))
        conn.execute(text("ALTER TABLE evaluations DROP COLUMN verdict"))
        conn.execute(text("UPDATE registry_state SET schema_version = 1"))
    store.close()


def test_a_schema_v1_registry_is_upgraded_and_its_evaluations_keep_their_meaning(registry_url):
    store = RegistryStore(registry_url)
    store.add_version("acme", new("a"), "alice")
    store.record_evaluation("acme", 1, "gate", "pass", {"verdict": "pass"}, "ci")
    store.record_evaluation("acme", 1, "manual", "fail", {}, "ci")
    # v1 gates recorded their errors as not passed, the report saying why
    store.record_evaluation("acme", 1, "gate", "fail", {"verdict": "error", "error": "x"}, "ci")
    store.close()
    _as_schema_v1(registry_url)

    upgraded = RegistryStore(registry_url)
    with upgraded.engine.connect() as conn:
        assert conn.execute(text("SELECT schema_version FROM registry_state")).scalar() == 2
    evaluations = upgraded.get_adapter("acme").versions[0].evaluations
    assert [(e.suite, e.verdict) for e in evaluations] == [
        ("gate", "pass"),
        ("manual", "fail"),
        ("gate", "error"),
    ]
    assert evaluations[2].report == {"verdict": "error", "error": "x"}
    upgraded.record_evaluation("acme", 1, "gate", "pass", {}, "ci")  # and it takes new ones
    upgraded.set_alias("acme", "production", 1, "ci", expected=0)
    upgraded.close()
    RegistryStore(registry_url).close()  # upgraded once: opening it again changes nothing
