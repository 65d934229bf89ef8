"""Neural Collapse metrics as pure functions of the class statistics and the classifier (float64 numpy, no I/O).

Notation (C classes, p features): class means mu_c, global mean mu_G, M = [mu_c - mu_G]_c of shape (p, C) (stored
as its transpose, rows mu_c - mu_G), Sigma_W, Sigma_B = (1/C) M M^T, Sigma_T = Sigma_W + M diag(pi) M^T, classifier
W (C, p) with rows w_c and bias b (C,). Standard deviations use Bessel's correction (count - 1); "pairs" are the
ordered pairs c != c'.

References
----------
Papyan, Han & Donoho, "Prevalence of neural collapse during the terminal phase of deep learning training",
PNAS 2020. Han, Papyan & Donoho, "Neural collapse under MSE loss: proximity to and dynamics on the central path",
ICLR 2022. Galanti, Gyorgy & Hutter, "On the role of neural collapse in transfer learning", ICLR 2022.
Webb & Lowe, "The optimised internal representation of multilayer classifier networks performs nonlinear
discriminant analysis", Neural Networks 1990. Liu et al., "Generalizing and Decoupling Neural Collapse via
Hyperspherical Uniformity Gap", ICLR 2023 (hyperspherical energy). Ammar et al., "NECO: NEural Collapse Based
Out-of-distribution Detection", ICLR 2024 (NC5).
"""

from ncaudit.metrics._energy import Energy, hyperspherical_energy
from ncaudit.metrics._least_squares import (
           LeastSquares,
           TotalPinv,
           least_squares,
           ls_cosine,
           ls_distance,
           ls_loss,
           mse_loss,
           mse_term_b,
           refine,
           total_pinv,
)
from ncaudit.metrics._nc1 import MeansBasis, means_basis, nc1, nc1_of_deviations
from ncaudit.metrics._nc3 import nc3
from ncaudit.metrics._nc5 import nc5
from ncaudit.metrics._numeric import EPS, PAIR_BLOCK_BYTES, TINY, block_rows
from ncaudit.metrics._pairs import (
           PairGeometry,
           cdnv,
           equiangle,
           equinorm,
           maxangle,
           orthogonality,
           pair_block_rows,
           pair_geometry,
)
from ncaudit.metrics._uncertainty import (
           LS_KEYS,
           Rounding,
           cdnv_uncertainty,
           nc1_uncertainty,
           nc3_uncertainty,
           rounding,
           rounding_unit,
)
from ncaudit.metrics._uncertainty import PROBES as UNCERTAINTY_PROBES
from ncaudit.metrics._uncertainty import WARN_ABOVE as UNCERTAINTY_WARN_ABOVE
from ncaudit.metrics._uncertainty_ls import LeastSquaresUncertainty, ls_arithmetic, ls_error_estimate, ls_uncertainty

__all__ = ["EPS", "LS_KEYS", "PAIR_BLOCK_BYTES", "TINY", "UNCERTAINTY_PROBES", "UNCERTAINTY_WARN_ABOVE", "Energy",
           "LeastSquares", "LeastSquaresUncertainty", "MeansBasis", "PairGeometry", "Rounding", "TotalPinv",
           "block_rows", "cdnv", "cdnv_uncertainty", "equiangle", "equinorm", "hyperspherical_energy", "least_squares",
           "ls_arithmetic", "ls_cosine", "ls_distance", "ls_error_estimate", "ls_loss", "ls_uncertainty", "maxangle",
           "means_basis", "mse_loss", "mse_term_b", "nc1", "nc1_of_deviations", "nc1_uncertainty", "nc3",
           "nc3_uncertainty", "nc5", "orthogonality", "pair_block_rows", "pair_geometry", "refine", "rounding",
           "rounding_unit", "total_pinv"]
