"""Privacy audits: gradient-inversion attacks (DLG, iDLG, Geiping et al.'s cosine) on a client's FedSGD update,
with and without DP."""

from fedlearn.attacks.audit import AuditResult, audit, audit_images, client_payload, release_epsilon
from fedlearn.attacks.gradient_inversion import (
    gradients_from_vector,
    idlg_label,
    invert_gradient,
    invert_gradient_cosine,
    recover_label,
)
from fedlearn.attacks.metrics import psnr, to_pixels
from fedlearn.attacks.models import DLGLeNet
from fedlearn.attacks.report import grid_image, save_grid

__all__ = [
    "AuditResult",
    "DLGLeNet",
    "audit",
    "audit_images",
    "client_payload",
    "gradients_from_vector",
    "grid_image",
    "idlg_label",
    "invert_gradient",
    "invert_gradient_cosine",
    "psnr",
    "recover_label",
    "release_epsilon",
    "save_grid",
    "to_pixels",
]
