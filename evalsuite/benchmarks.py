"""Driving lm-eval for the gate: the policy's benchmarks on one served system, through the
gateway, read back as one score per check. lm-eval's task loading and result layout stay here,
away from the decisions and the orchestration.
"""

from __future__ import annotations

from evalsuite.errors import EvalError, EvalInputError, gateway_deadline
from evalsuite.policy import GatePolicy

BOOTSTRAP_ITERS = 1000  # lm-eval's stderr estimates; its default (100k) is slow and not used here


def run_benchmarks(
    target: str, reference: str, policy: GatePolicy
) -> tuple[dict[str, float], dict[str, bool]]:
    """lm-eval scores of one served system: ({check key: score}, {check key: higher is better}).

    `reference` is "" (the base) or a pinned NAME@vN. Every request carries the policy's
    deadline. The backend reports which versions answered; anything but `reference` is an error
    (an evaluation must be of exactly one version)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evalsuite.lm_eval_backend import LoraplexLM

    manager = TaskManager(include_path=[str(p) for p in policy.include_paths] or None)
    unknown = [t for t in policy.tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalInputError(f"unknown lm-eval task(s) {unknown}; check include_paths")
    timeout = policy.request_timeout_s
    with gateway_deadline(target, f"an lm-eval request to {reference or 'base'!r}", timeout):
        lm = LoraplexLM(
            target=target, adapter=reference, concurrency=policy.concurrency, timeout=timeout
        )
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=policy.tasks,
            task_manager=manager,
            limit=policy.limit,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
        )
    expected = {reference if reference else "base"}
    if lm.served_versions != expected:
        raise EvalError(f"asked for {expected} but {sorted(lm.served_versions)} answered")
    scores: dict[str, float] = {}
    directions: dict[str, bool] = {}
    for check in policy.benchmarks:
        task_results = output["results"].get(check.task, {})
        metric_key = f"{check.metric},{check.filter}"
        if metric_key not in task_results:
            reported = sorted(k for k in task_results if "," in k and "_stderr" not in k)
            raise EvalInputError(
                f"task {check.task} reports no {metric_key!r} (it reports: {reported})"
            )
        scores[check.key] = float(task_results[metric_key])
        directions[check.key] = bool(output["higher_is_better"][check.task][check.metric])
    return scores, directions
