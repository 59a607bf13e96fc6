"""Human preference ratings: export pairs blinded, read the votes back, and turn them into the
candidate's outcomes for the same `summarize_pairwise` the automatic judges feed.

Blinding: the rating files show each pair's answers as A and B in a per-pair random order (from
a seed) and never name a system or version; which side is the candidate is in a separate key
file that stays with whoever runs the evaluation.

Several votes on one pair (several raters) are reduced to ONE outcome per pair by strict
majority (candidate wins if more than half the votes prefer it, loses if more than half prefer
the baseline, else a tie). The pair, not the vote, is the unit: raters judging the same answers
are not independent samples of the prompts, and counting each vote would overstate the sample
size and narrow the confidence interval.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evalsuite.errors import EvalInputError
from evalsuite.judges.base import LOSS, TIE, WIN

if TYPE_CHECKING:
    from evalsuite.compare import Pair
    from evalsuite.stats import PairwiseSummary

KEY_FORMAT = "loraplex.human-key.v1"
RATING_COLUMNS = ("id", "export", "prompt", "reference", "answer_a", "answer_b", "vote")
VOTES = {"a": "A", "b": "B", "tie": "tie"}
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class HumanExport:
    """Where an export was written: the two rating files (for raters) and the key (not)."""

    jsonl: Path
    csv: Path
    key: Path
    export_id: str


def export_for_rating(
    pairs: Sequence[Pair], rating_dir: str | Path, key_path: str | Path, seed: int = 0
) -> HumanExport:
    """Write `rating_dir`/pairs.jsonl and pairs.csv (blinded, `vote` left empty) and the key.

    The key must live outside `rating_dir`, so sending the folder to raters cannot unblind them.
    """
    rating_dir, key_path = Path(rating_dir), Path(key_path)
    if key_path.resolve().is_relative_to(rating_dir.resolve()):
        raise EvalInputError(f"{key_path}: keep the key outside {rating_dir} (sent to raters)")
    ids = [p.id for p in pairs]
    if len(set(ids)) != len(ids):
        raise EvalInputError("pair ids must be unique to export them for rating")
    export_id = (
        "x-"
        + hashlib.sha256(
            json.dumps([seed, [[p.id, p.candidate, p.baseline] for p in pairs]]).encode()
        ).hexdigest()[:12]
    )
    rows, sides = [], {}
    for pair in pairs:
        side = "A" if random.Random(f"{seed}:{pair.id}").random() < 0.5 else "B"
        a, b = (pair.candidate, pair.baseline) if side == "A" else (pair.baseline, pair.candidate)
        sides[pair.id] = side
        rows.append(
            {
                "id": pair.id,
                "export": export_id,
                "prompt": pair.prompt,
                "reference": pair.reference or "",
                "answer_a": a,
                "answer_b": b,
                "vote": "",
            }
        )
    rating_dir.mkdir(parents=True, exist_ok=True)
    export = HumanExport(rating_dir / "pairs.jsonl", rating_dir / "pairs.csv", key_path, export_id)
    with export.jsonl.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with export.csv.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RATING_COLUMNS)
        writer.writeheader()
        writer.writerows({k: _csv_text(v) for k, v in row.items()} for row in rows)
    key = {
        "format": KEY_FORMAT,
        "export": export_id,
        "seed": seed,
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
        "candidate_versions": sorted({p.candidate_version for p in pairs}),
        "baseline_versions": sorted({p.baseline_version for p in pairs}),
        "candidate_side": sides,
    }
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_text(json.dumps(key, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return export


def _csv_text(value: str) -> str:
    """Model output opened in a spreadsheet must not run as a formula (CSV injection): a leading
    apostrophe makes it text. The JSONL export carries the text untouched."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def _csv_untext(value: str) -> str:
    """`_csv_text` undone. A text that itself began with an apostrophe and a formula character
    reads back without the apostrophe: only the JSONL export is exact (see `export_id_of`)."""
    return value[1:] if value.startswith("'") and value[1:].startswith(_FORMULA_START) else value


def export_id_of(key: dict[str, Any], texts: dict[str, tuple[str, str]]) -> str:
    """The export id that `export_for_rating` derives from the key's seed and every pair's
    (candidate, baseline) texts, in the key's order: equal to the key's `export` exactly when the
    texts are the ones the raters were shown."""
    ordered = [[id_, *texts[id_]] for id_ in key["candidate_side"]]
    digest = hashlib.sha256(json.dumps([key.get("seed", 0), ordered]).encode()).hexdigest()
    return "x-" + digest[:12]


@dataclass(frozen=True)
class Vote:
    """One rater's vote on one pair, and where it was read ("file:line")."""

    id: str
    vote: str  # "A", "B" or "tie"
    rater: str
    export: str
    source: str


def load_key(path: str | Path) -> dict[str, Any]:
    """The key written by `export_for_rating`."""
    path = Path(path)
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalInputError(f"{path}: key file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalInputError(f"{path}: cannot read the key file: {e}") from None
    sides = key.get("candidate_side") if isinstance(key, dict) else None
    if (
        not isinstance(key, dict)
        or key.get("format") != KEY_FORMAT
        or not isinstance(sides, dict)
        or not all(v in ("A", "B") for v in sides.values())
    ):
        raise EvalInputError(f"{path}: not a {KEY_FORMAT} key file")
    return key


def _table_rows(path: Path, what: str) -> Any:
    """(where, row) of a CSV or JSONL file, by its extension."""
    if path.suffix.lower() == ".csv":
        return _csv_rows(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        return _jsonl_rows(path)
    raise EvalInputError(f"{path}: {what} must be a .csv or .jsonl file")


def load_votes(path: str | Path) -> list[Vote]:
    """Votes from CSV or JSONL (by extension) with `id` and `vote` (A, B or tie; any case) and
    optionally `rater`; other columns (the exported ones) are ignored, an empty vote means "not
    rated". Every bad line is reported at once, as file:line."""
    path = Path(path)
    rows = _table_rows(path, "votes")
    votes, problems, seen = [], [], {}
    for where, row in rows:
        if isinstance(row, str):
            problems.append(f"{where}: {row}")
            continue
        raw_vote = row.get("vote")
        if raw_vote is None or str(raw_vote).strip() == "":
            continue
        id_ = str(row.get("id") if row.get("id") is not None else "").strip()
        vote = VOTES.get(str(raw_vote).strip().lower())
        rater = str(row.get("rater") or "").strip()
        if not id_:
            problems.append(f"{where}: missing 'id'")
        elif vote is None:
            problems.append(f"{where}: vote must be A, B or tie, got {raw_vote!r}")
        elif rater and (id_, rater) in seen:
            problems.append(f"{where}: {rater!r} already voted on {id_!r} at {seen[id_, rater]}")
        else:
            if rater:
                seen[id_, rater] = where
            votes.append(Vote(id_, vote, rater, str(row.get("export") or "").strip(), where))
    if problems:
        raise EvalInputError("\n".join(problems))
    return votes


@dataclass(frozen=True)
class RatedPair:
    """One exported pair as the raters saw it (blinded), and where it was read ("file:line")."""

    id: str
    export: str
    prompt: str
    answer_a: str
    answer_b: str
    source: str


def load_rated_pairs(path: str | Path) -> list[RatedPair]:
    """The prompt and both answers of each pair in an export's pairs.jsonl / pairs.csv, or in a
    votes file that kept those columns (the export filled in): the texts the key does not hold.
    CSV cells are un-defused (`_csv_untext`). Every bad line is reported at once, as file:line."""
    path = Path(path)
    rows = _table_rows(path, "an export")
    pairs, problems = [], []
    for where, row in rows:
        if isinstance(row, str):
            problems.append(f"{where}: {row}")
            continue
        missing = [c for c in ("id", "prompt", "answer_a", "answer_b") if row.get(c) is None]
        if missing:
            problems.append(f"{where}: missing {missing}: the texts of the pair are not here")
            continue
        texts = [row[c] for c in ("prompt", "answer_a", "answer_b")]
        if not all(isinstance(t, str) for t in texts):
            problems.append(f"{where}: prompt, answer_a and answer_b must be strings")
            continue
        if path.suffix.lower() == ".csv":
            texts = [_csv_untext(t) for t in texts]
        export = str(row.get("export") or "").strip()
        pairs.append(RatedPair(str(row["id"]).strip(), export, *texts, source=where))
    if problems:
        raise EvalInputError("\n".join(problems))
    return pairs


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # spreadsheets often add a BOM
    except FileNotFoundError:
        raise EvalInputError(f"{path}: votes file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalInputError(f"{path}: cannot read the votes: {e}") from None


def _csv_rows(path: Path) -> Iterator[tuple[str, dict | str]]:
    """(file:line, row or a problem); line is where the record starts (cells may span lines)."""
    lines = _read(path).splitlines(keepends=True)
    reader = csv.DictReader(lines)
    try:
        columns = reader.fieldnames or []
    except csv.Error as e:
        raise EvalInputError(f"{path}:1: bad CSV header: {e}") from None
    missing = [c for c in ("id", "vote") if c not in columns]
    if missing:
        raise EvalInputError(f"{path}:1: missing column(s) {missing} (has {columns})")
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield f"{path}:{start}", f"bad CSV: {e}"
            return
        yield f"{path}:{start}", row
        start = reader.line_num + 1


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict | str]]:
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{number}", f"not valid JSON ({e.msg})"
            continue
        yield f"{path}:{number}", row if isinstance(row, dict) else "expected a JSON object"


@dataclass
class HumanResult:
    """The candidate's outcome per rated pair (majority of its votes) and the summary."""

    ids: list[str]
    outcomes: list[float]
    details: list[dict]
    summary: PairwiseSummary
    unrated: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "judge": "human",
            "summary": self.summary.to_dict(),
            "unrated": list(self.unrated),
            "pairs": [
                {"id": i, "outcome": o, "votes": d}
                for i, o, d in zip(self.ids, self.outcomes, self.details, strict=True)
            ],
        }


def votes_to_outcomes(
    votes: Sequence[Vote], key: dict[str, Any], key_source: str = "key"
) -> tuple[list[str], list[float], list[dict], list[str]]:
    """(ids, outcomes, vote counts, unrated ids) in the key's pair order, majority per pair."""
    sides: dict[str, str] = key["candidate_side"]
    problems = []
    counts = {id_: {"candidate": 0, "baseline": 0, "tie": 0} for id_ in sides}
    for v in votes:
        if v.id not in sides:
            problems.append(f"{v.source}: unknown pair id {v.id!r} (not in {key_source})")
        elif v.export and v.export != key.get("export"):
            problems.append(
                f"{v.source}: rated export {v.export!r}, "
                f"but {key_source} is for {key.get('export')!r}"
            )
        else:
            won = v.vote == sides[v.id]
            side = "tie" if v.vote == "tie" else "candidate" if won else "baseline"
            counts[v.id][side] += 1
    if problems:
        raise EvalInputError("\n".join(problems))
    ids, outcomes, details, unrated = [], [], [], []
    for id_, c in counts.items():
        n = sum(c.values())
        if n == 0:
            unrated.append(id_)
            continue
        ids.append(id_)
        outcomes.append(WIN if 2 * c["candidate"] > n else LOSS if 2 * c["baseline"] > n else TIE)
        details.append(dict(c))
    return ids, outcomes, details, unrated


def score_votes(
    votes: str | Path | Sequence[str | Path],
    key: str | Path,
    *,
    confidence: float = 0.95,
    resamples: int = 10000,
    seed: int = 0,
) -> HumanResult:
    """Votes files (one or several, e.g. one per rater) + the key -> outcomes and summary."""
    from evalsuite.stats import summarize_pairwise

    paths = [votes] if isinstance(votes, str | Path) else list(votes)
    loaded = [v for p in paths for v in load_votes(p)]
    ids, outcomes, details, unrated = votes_to_outcomes(loaded, load_key(key), str(key))
    if not outcomes:
        raise EvalInputError(f"no votes in {', '.join(str(p) for p in paths)}")
    summary = summarize_pairwise(outcomes, confidence=confidence, resamples=resamples, seed=seed)
    return HumanResult(ids, outcomes, details, summary, unrated)
