"""Preference evidence -> training pairs: human votes, `compare` results (any judge, or a gate
report's comparison) and `rank` runs become `{"prompt", "chosen", "rejected"}` JSONL that
`loraplex train dpo` and `train reward` read as is.

trainer/data.py refuses any other key in a preference record, so each pair's provenance (which
judge or raters, which versions, when, which prompt, from which file) goes to a line-aligned
sidecar, `<out>.provenance.jsonl`: line N there describes line N of the pairs file.

Ties are dropped by default. `ties="keep"` writes a tie as both orders (A>B and B>A): in a
Bradley-Terry reward loss or the DPO loss the two mirrored pairs' gradients push the two answers'
scores (or implicit rewards) toward each other, so a tie teaches "these are equally good", not a
preference. Pairs with identical answers (nothing to learn; training refuses them) or an empty
one are always dropped. The same (prompt, chosen, rejected) from several inputs is written once,
with every source in its provenance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from evalsuite.errors import EvalInputError
from evalsuite.human import (
    KEY_FORMAT,
    RatedPair,
    export_id_of,
    load_key,
    load_rated_pairs,
    load_votes,
)

Kind = Literal["votes", "compare", "rank"]
KINDS: tuple[Kind, ...] = ("votes", "compare", "rank")
Ties = Literal["drop", "keep"]
PROVENANCE_FORMAT = "loraplex.pairs-provenance.v1"
OUTCOMES = {1.0: "candidate", 0.5: "tie", 0.0: "baseline"}


def provenance_path(out: str | Path) -> Path:
    """The sidecar next to a pairs file: pairs.jsonl -> pairs.jsonl.provenance.jsonl."""
    out = Path(out)
    return out.with_name(out.name + ".provenance.jsonl")


@dataclass(frozen=True)
class Judged:
    """One judged pair of answers to a prompt: `outcome` is answer `a`'s (1 win, 0.5 tie, 0
    loss); `source` is its provenance (kind, file, judge or raters, versions of a and b...)."""

    prompt: str
    a: str
    b: str
    outcome: float
    source: dict[str, Any]


@dataclass
class SourceCounts:
    """What became of one input's judged pairs (the summary line of that input)."""

    kind: str
    judged: int = 0
    written: int = 0  # new rows (a tie kept counts its two orders)
    merged: int = 0  # rows already written from an earlier input or pair: source added there
    ties_dropped: int = 0
    ties_kept: int = 0
    identical: int = 0
    empty: int = 0
    unrated: int = 0  # votes: exported pairs nobody voted on

    def describe(self) -> str:
        parts = [f"{self.judged} judged", f"{self.written} pairs written"]
        optional = {
            "merged into duplicates": self.merged,
            "ties dropped": self.ties_dropped,
            "ties kept (both orders)": self.ties_kept,
            "identical answers dropped": self.identical,
            "empty answer dropped": self.empty,
            "unrated": self.unrated,
        }
        parts += [f"{n} {what}" for what, n in optional.items() if n]
        return ", ".join(parts)


@dataclass
class PairSet:
    """The training rows, their line-aligned provenance, and per-input counts."""

    rows: list[dict[str, str]] = field(default_factory=list)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, SourceCounts] = field(default_factory=dict)
    _index: dict[tuple[str, str, str], int] = field(default_factory=dict, repr=False)

    def add(self, judged: Judged, file: str, ties: Ties) -> None:
        """One judged pair in: dropped, written (once or, a kept tie, in both orders) or merged."""
        counts = self.counts[file]
        counts.judged += 1
        if judged.a == judged.b:
            counts.identical += 1
            return
        if not judged.prompt.strip() or not judged.a.strip() or not judged.b.strip():
            counts.empty += 1
            return
        if judged.outcome == 0.5:
            if ties == "drop":
                counts.ties_dropped += 1
                return
            counts.ties_kept += 1
            self._put(judged.prompt, judged.a, judged.b, {**judged.source, "tie": "a>b"}, counts)
            self._put(judged.prompt, judged.b, judged.a, _swapped(judged.source), counts)
        elif judged.outcome == 1.0:
            self._put(judged.prompt, judged.a, judged.b, judged.source, counts)
        else:
            self._put(judged.prompt, judged.b, judged.a, _swapped(judged.source), counts)

    def _put(
        self, prompt: str, chosen: str, rejected: str, source: dict, counts: SourceCounts
    ) -> None:
        key = (prompt, chosen, rejected)
        if key in self._index:
            entry = self.provenance[self._index[key]]
            entry["sources"].append(source)
            entry["tie"] = entry["tie"] and "tie" in source
            counts.merged += 1
            return
        self._index[key] = len(self.rows)
        self.rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        self.provenance.append(
            {
                "format": PROVENANCE_FORMAT,
                "line": len(self.rows),
                "prompt_id": source.get("prompt_id"),
                "tie": "tie" in source,
                "sources": [source],
            }
        )
        counts.written += 1


def _swapped(source: dict[str, Any]) -> dict[str, Any]:
    """The provenance of the b-over-a row: chosen and rejected versions swap."""
    swapped = {**source, "chosen": source.get("rejected"), "rejected": source.get("chosen")}
    if "tie" in source or source.get("outcome") == 0.5:
        swapped["tie"] = "b>a"
    return swapped


# ---------------------------------------------------------------- reading the inputs


def detect_kind(path: Path) -> Kind:
    """What an input holds, from its content: a votes file (CSV/JSONL rows with a `vote`), a
    `compare` result or gate report (one JSON object with judged pairs), or a `rank` result."""
    if not path.is_file():
        raise EvalInputError(f"{path}: not found" if not path.exists() else f"{path}: not a file")
    if path.suffix.lower() == ".csv":
        return "votes"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{path}: cannot read: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        if "vote" in data:  # a votes JSONL of one line
            return "votes"
        if data.get("format") == KEY_FORMAT:
            raise EvalInputError(f"{path}: this is a human export's key: pass it with --key")
        if "comparisons" in data or "ratings" in data:
            return "rank"
        if data.get("judge") == "human":
            raise EvalInputError(
                f"{path}: a score-votes result holds outcomes, not the texts: "
                "pass the votes files and --key instead"
            )
        if isinstance(data.get("pairs"), list) or isinstance(data.get("preference"), dict):
            return "compare"
        raise EvalInputError(
            f"{path}: not a compare, rank or gate result (no 'pairs', 'comparisons' or "
            "'preference'); pass --kind if it is one"
        )
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        row = None
    if isinstance(row, dict) and "vote" in row:
        return "votes"
    raise EvalInputError(
        f"{path}:1: cannot tell what this holds (votes rows have a 'vote'; compare and rank "
        "results are one JSON object); pass --kind"
    )


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalInputError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{path}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise EvalInputError(f"{path}:1: expected a JSON object, got {type(data).__name__}")
    return data


def _text(value: Any) -> bool:
    return isinstance(value, str)


def comparison_pairs(
    comparison: dict[str, Any], where: str, common: dict[str, Any]
) -> Iterator[Judged]:
    """Judged pairs of one `ComparisonResult.to_dict()`: the candidate is answer a."""
    pairs = comparison.get("pairs")
    if not isinstance(pairs, list):
        raise EvalInputError(f"{where}: no 'pairs' list")
    problems = []
    judge = comparison.get("judge")
    for i, pair in enumerate(pairs):
        at = f"{where}.pairs[{i}]"
        if not isinstance(pair, dict):
            problems.append(f"{at}: expected an object")
            continue
        missing = [k for k in ("prompt", "candidate", "baseline", "outcome") if k not in pair]
        if missing:
            problems.append(f"{at}: missing {missing}")
            continue
        if not all(_text(pair[k]) for k in ("prompt", "candidate", "baseline")):
            problems.append(f"{at}: prompt, candidate and baseline must be strings")
            continue
        outcome = pair["outcome"]
        if isinstance(outcome, bool) or outcome not in OUTCOMES:
            problems.append(f"{at}: outcome must be 1, 0.5 or 0, got {outcome!r}")
            continue
        chosen_version = pair.get("candidate_version") or comparison.get("candidate_version")
        rejected_version = pair.get("baseline_version") or comparison.get("baseline_version")
        source = {
            **common,
            "where": at,
            "prompt_id": None if pair.get("id") is None else str(pair["id"]),
            "judge": judge,
            "judge_config": comparison.get("judge_config", {}),
            "judge_detail": pair.get("judge"),
            "candidate": comparison.get("candidate"),
            "baseline": comparison.get("baseline"),
            "chosen": chosen_version,
            "rejected": rejected_version,
            "outcome": float(outcome),
        }
        yield Judged(pair["prompt"], pair["candidate"], pair["baseline"], float(outcome), source)
    if problems:
        raise EvalInputError("\n".join(problems))


def compare_pairs(path: Path) -> list[Judged]:
    """A `compare --out` result, or a gate report.json (its `preference` comparison)."""
    data = _load_json(path)
    common: dict[str, Any] = {"kind": "compare", "file": str(path), "time": data.get("time")}
    if isinstance(data.get("preference"), dict):  # a gate report
        common["time"] = data.get("started")
        common["gate_verdict"] = data.get("verdict")
        return list(comparison_pairs(data["preference"], f"{path}: preference", common))
    if data.get("preference", "") is None:
        raise EvalInputError(f"{path}: this gate report ran no comparison (preference is null)")
    return list(comparison_pairs(data, str(path), common))


def rank_pairs(path: Path) -> list[Judged]:
    """A `rank --out` result: every pair of systems' comparison, each with its texts."""
    data = _load_json(path)
    comparisons = data.get("comparisons")
    if not isinstance(comparisons, list):
        raise EvalInputError(
            f"{path}: no 'comparisons' (only ratings): rank results hold the judged texts "
            "since `eval pairs` exists; run rank again with --out"
        )
    judged = []
    for j, comparison in enumerate(comparisons):
        where = f"{path}: comparisons[{j}]"
        if not isinstance(comparison, dict):
            raise EvalInputError(f"{where}: expected an object")
        common = {"kind": "rank", "file": str(path), "time": data.get("time")}
        judged += comparison_pairs(comparison, where, common)
    return judged


def votes_pairs(
    votes: Sequence[Path], key_path: Path, texts_from: Sequence[Path] = ()
) -> tuple[list[Judged], int]:
    """Human votes unblinded by the key: (judged pairs, unrated count). One outcome per pair,
    the strict majority of its votes (as `score-votes`); the raters and their votes go into the
    provenance. The texts come from `texts_from` (the export's pairs.jsonl) or else from the
    votes files themselves, and must be the exported ones (checked against the key's export
    id whenever every pair's texts are at hand)."""
    from evalsuite.human import votes_to_outcomes

    key = load_key(key_path)
    sides: dict[str, str] = key["candidate_side"]
    loaded = [v for p in votes for v in load_votes(p)]
    ids, outcomes, counts, unrated = votes_to_outcomes(loaded, key, str(key_path))
    rated: dict[str, RatedPair] = {}
    for path in [p / "pairs.jsonl" if p.is_dir() else p for p in texts_from] or votes:
        try:
            read = load_rated_pairs(path)
        except EvalInputError as e:
            hint = "" if texts_from else "\n(or pass the export's pairs.jsonl with --export)"
            raise EvalInputError(f"{e}{hint}") from None
        for pair in read:
            if pair.export and pair.export != key.get("export"):
                raise EvalInputError(
                    f"{pair.source}: export {pair.export!r}, but {key_path} is for "
                    f"{key.get('export')!r}"
                )
            if pair.id not in sides:
                raise EvalInputError(f"{pair.source}: unknown pair id {pair.id!r} (not in key)")
            seen = rated.setdefault(pair.id, pair)
            if (seen.prompt, seen.answer_a, seen.answer_b) != (
                pair.prompt,
                pair.answer_a,
                pair.answer_b,
            ):
                raise EvalInputError(
                    f"{pair.source}: pair {pair.id!r} differs from {seen.source}: "
                    "the texts were edited"
                )
    missing = [i for i in ids if i not in rated]
    if missing:
        raise EvalInputError(
            f"no texts for voted pair(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
            "pass the export's pairs.jsonl with --export"
        )
    verified = set(rated) >= set(sides)
    if verified:
        texts = {
            i: (p.answer_a, p.answer_b) if sides[i] == "A" else (p.answer_b, p.answer_a)
            for i, p in rated.items()
        }
        if export_id_of(key, texts) != key.get("export"):
            shown = ", ".join(str(p) for p in texts_from or votes)
            raise EvalInputError(
                f"the texts in {shown} are not the ones export {key.get('export')!r} showed "
                "(edited, or changed by a spreadsheet): pass the export's pairs.jsonl with --export"
            )
    raters: dict[str, list[dict[str, str]]] = {}
    for v in loaded:
        side = "tie" if v.vote == "tie" else "candidate" if v.vote == sides[v.id] else "baseline"
        raters.setdefault(v.id, []).append({"rater": v.rater, "vote": side, "at": v.source})
    candidate_versions = key.get("candidate_versions") or []
    baseline_versions = key.get("baseline_versions") or []
    judged = []
    for id_, outcome, count in zip(ids, outcomes, counts, strict=True):
        pair = rated[id_]
        a, b = (
            (pair.answer_a, pair.answer_b) if sides[id_] == "A" else (pair.answer_b, pair.answer_a)
        )
        source = {
            "kind": "votes",
            "file": ", ".join(str(p) for p in votes),
            "key": str(key_path),
            "export": key.get("export"),
            "texts": pair.source,
            "texts_verified": verified,
            "time": key.get("exported"),
            "prompt_id": id_,
            "judge": "human",
            "raters": raters.get(id_, []),
            "votes": count,
            "chosen": _one(candidate_versions),
            "rejected": _one(baseline_versions),
            "outcome": outcome,
        }
        judged.append(Judged(pair.prompt, a, b, outcome, source))
    return judged, len(unrated)


def _one(versions: list[str]) -> str | list[str] | None:
    return versions[0] if len(versions) == 1 else (versions or None)


# ---------------------------------------------------------------- the whole job


def build_pairs(
    inputs: Sequence[str | Path],
    *,
    kind: Kind | None = None,
    key: str | Path | None = None,
    export: Sequence[str | Path] = (),
    ties: Ties = "drop",
) -> PairSet:
    """Every input read (its kind detected unless given), judged pairs turned into rows. All
    votes files go with the one `key` (one export); `export`: its pairs.jsonl for exact texts."""
    if ties not in ("drop", "keep"):
        raise EvalInputError(f"ties must be drop or keep, got {ties!r}")
    if not inputs:
        raise EvalInputError("no inputs")
    paths = [Path(p) for p in inputs]
    kinds = {p: kind or detect_kind(p) for p in paths}
    votes = [p for p in paths if kinds[p] == "votes"]
    if votes and key is None:
        raise EvalInputError(
            f"votes ({', '.join(map(str, votes))}) need --key, the export's key file"
        )
    if key is not None and not votes:
        raise EvalInputError("--key given but no votes files among the inputs")
    result = PairSet()
    votes_label = ", ".join(str(p) for p in votes)
    for path in paths:
        if kinds[path] == "votes":
            if votes_label in result.counts:
                continue  # all votes files are read together: one outcome per pair
            assert key is not None
            judged, unrated = votes_pairs(votes, Path(key), [Path(e) for e in export])
            label = votes_label
            result.counts[label] = SourceCounts("votes", unrated=unrated)
        else:
            judged = compare_pairs(path) if kinds[path] == "compare" else rank_pairs(path)
            label = str(path)
            result.counts[label] = SourceCounts(kinds[path])
        for item in judged:
            result.add(item, label, ties)
    return result


def write_pairs(pairs: PairSet, out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """The pairs JSONL and its provenance sidecar, each written whole or not at all; refuses to
    replace either unless `force`. A pairs file must end in .jsonl (what training reads)."""
    out = Path(out)
    sidecar = provenance_path(out)
    if out.suffix.lower() != ".jsonl":
        raise EvalInputError(f"{out}: the pairs file must end in .jsonl (training reads JSONL)")
    if not force:
        exists = [str(p) for p in (out, sidecar) if p.exists()]
        if exists:
            raise EvalInputError(f"{', '.join(exists)} already exist(s); --force replaces")
    if not pairs.rows:
        raise EvalInputError("no pairs to write (every judged pair was dropped)")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, rows in ((out, pairs.rows), (sidecar, pairs.provenance)):
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return out, sidecar
