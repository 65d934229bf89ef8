"""What an audit computes for the metrics asked (``report --metrics``, ``AuditOptions.metrics``): :class:`Plan`.

Every metric is a function of pass 1's class statistics, some also of pass 2's per-sample decisions. The plan runs
only the passes and closed forms the chosen metrics read (a metric key -> what it needs):

==============================================================  ===================================================
metric                                                          computed from
==============================================================  ===================================================
``nc1``                                                         pass 1; the Sigma_B basis (SVD of the C x p centred
                                                                means); its uncertainty; the precision floor (for
                                                                its warning, from the reference rows only)
``nc1_precision_floor``                                         the basis and the float32 reference rows
``cdnv``, ``nc2_equiangle_means``, ``nc2_maxangle_means``       the blocked pair geometry of the centred means
``energy_log_means``, ``energy_riesz_means``                    the same blocks, with the energies
``nc2_equinorm_means``                                          the norms of the centred means
``nc2_orthogonality_means``                                     the pair blocks of the raw means
``nc2_equiangle/maxangle/orthogonality_classifier``,            the blocked pair geometry of W (energies only when
``energy_*_classifier``                                         an energy is chosen)
``nc2_equinorm_classifier``, ``nc3``                            W (and the centred means)
``mse_loss``                                                    its closed form from Sigma_T and the means
``mse_term_a``, ``mse_term_b``, ``ls_distance``, ``ls_cosine``  the least-squares classifier W_LS (Sigma_T^dagger,
                                                                the basis), refined on the samples when its error
                                                                estimate asks; term B also ``mse_loss``
``ncc_accuracy``                                                pass 2, nearest-class-mean decisions only
``accuracy``, ``nc4``                                           pass 2, classifier and nearest-class-mean decisions
``nc5``                                                         the pass over the OOD features
==============================================================  ===================================================

Pass 2 runs only for ``ncc_accuracy``, ``accuracy``, ``nc4``, or per-class NC1 (``nc1`` with ``per_class``). The
per-class rows always hold the pass-1 values (count, norms, variance); their sample-level values (``nc1``,
``accuracy``, ``ncc_accuracy``) only for the chosen metrics that were computed. Per layer, the chosen keys among NC1,
CDNV, NC2 of the means and NCC accuracy. ``--means-from`` reads the training cache only for ``ncc_accuracy``, ``nc4``
or ``cdnv``; ``--ood`` reads the OOD features only for ``nc5``. ``details.mse_check`` (the direct MSE against the
closed forms) rides along when pass 2 decides with the classifier and the least-squares terms are computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ncaudit.audit._checks import resolve_metric
from ncaudit.audit._result import METRIC_KEYS
from ncaudit.errors import InputError

#: Metrics that need the decisions of pass 2.
SAMPLE_METRICS = ("nc4", "accuracy", "ncc_accuracy")
#: Metrics of the least-squares classifier W_LS.
LS_METRICS = ("mse_term_a", "mse_term_b", "ls_distance", "ls_cosine")
#: Metrics read from the blocked pair geometry of the centred class means.
MEAN_PAIR_METRICS = ("cdnv", "nc2_equiangle_means", "nc2_maxangle_means", "energy_log_means", "energy_riesz_means")
#: Metrics read from the blocked pair geometry of the classifier rows.
CLASSIFIER_PAIR_METRICS = ("nc2_equiangle_classifier", "nc2_maxangle_classifier", "nc2_orthogonality_classifier",
                           "energy_log_classifier", "energy_riesz_classifier")
#: Metrics that ``--means-from`` measures against the training means (as ``MEANS_FROM_METRICS``).
TRAINING_MEANS_METRICS = ("ncc_accuracy", "nc4", "cdnv")


@dataclass(frozen=True)
class Plan:
    """What one audit computes.

    Attributes
    ----------
    keys : the metric keys reported, in table order (None: every key, the default report).
    basis : the Sigma_B basis (NC1, the precision floor, per-class NC1, least squares).
    mean_pairs, mean_energy : the pair geometry of the centred means; with the hyperspherical energies.
    classifier_pairs, classifier_energy : the same for the classifier rows.
    least_squares : W_LS, its terms and refinement.
    mse_loss : L(W, b) in closed form (``mse_loss`` itself, term B and the least-squares uncertainty need it).
    decisions : pass 2.
    classifier_decisions : pass 2 also scores the classifier (else the nearest class mean only).
    per_class_nc1 : pass 2 accumulates the per-class NC1 traces.
    floor : the NC1 precision floor from the reference rows.
    training_means : ``--means-from`` reads the training cache.
    ood : ``--ood`` reads the OOD features.
    """

    keys: tuple[str, ...] | None
    basis: bool = True
    mean_pairs: bool = True
    mean_energy: bool = True
    classifier_pairs: bool = True
    classifier_energy: bool = True
    least_squares: bool = True
    mse_loss: bool = True
    decisions: bool = True
    classifier_decisions: bool = True
    per_class_nc1: bool = True
    floor: bool = True
    training_means: bool = True
    ood: bool = True

    @property
    def full(self) -> bool:
        """Every metric (the default report)."""
        return self.keys is None

    def wants(self, key: str) -> bool:
        """Whether metric ``key`` is reported."""
        return self.keys is None or key in self.keys

    def any(self, keys: Iterable[str]) -> bool:
        return any(self.wants(k) for k in keys)


#: The default: every pass and closed form.
FULL = Plan(None)


def resolve_metrics(names: str | Sequence[str] | None, *, flag: str = "--metrics") -> tuple[str, ...] | None:
    """The metric keys that ``names`` names (a sequence, or one string of keys separated by commas), in any case, in
    the report's order; None for None.

    Raises
    ------
    InputError
        An unknown key (the message names the nearest one), or no key at all.
    """
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    parts = [part.strip() for name in names for part in str(name).split(",") if part.strip()]
    if not parts:
        raise InputError(f"{flag} names no metric; give metric keys such as 'nc1' or 'nc1,accuracy' (the README's "
                         "metric table lists every key)")
    chosen = {resolve_metric(part, METRIC_KEYS, ",".join(parts), flag=flag) for part in parts}
    return tuple(k for k in METRIC_KEYS if k in chosen)


def make_plan(metrics: str | Sequence[str] | None, per_class: bool = False) -> Plan:
    """The plan for the metrics asked (None: every metric); ``per_class`` adds the per-class values of the chosen
    sample-level metrics (per-class NC1 takes pass 2)."""
    keys = resolve_metrics(metrics)
    if keys is None:
        return FULL
    want = set(keys)
    least_squares = bool(want & set(LS_METRICS))
    per_class_nc1 = per_class and "nc1" in want
    decisions = bool(want & set(SAMPLE_METRICS)) or per_class_nc1
    return Plan(
        keys=keys,
        basis="nc1" in want or "nc1_precision_floor" in want or least_squares or per_class_nc1,
        mean_pairs=bool(want & set(MEAN_PAIR_METRICS)),
        mean_energy=bool(want & {"energy_log_means", "energy_riesz_means"}),
        classifier_pairs=bool(want & set(CLASSIFIER_PAIR_METRICS)),
        classifier_energy=bool(want & {"energy_log_classifier", "energy_riesz_classifier"}),
        least_squares=least_squares,
        mse_loss="mse_loss" in want or least_squares,
        decisions=decisions,
        classifier_decisions=bool(want & {"accuracy", "nc4"}),
        per_class_nc1=per_class_nc1,
        floor="nc1" in want or "nc1_precision_floor" in want,
        training_means=bool(want & set(TRAINING_MEANS_METRICS)),
        ood="nc5" in want,
    )


def with_checks(metrics: str | Sequence[str] | None, check_keys: Iterable[str]) -> tuple[str, ...] | None:
    """The metrics asked plus the keys of the ``--fail-if`` checks (which are always computed); None stays None
    (every metric)."""
    keys = resolve_metrics(metrics)
    if keys is None:
        return None
    want = set(keys) | set(check_keys)
    return tuple(k for k in METRIC_KEYS if k in want)
