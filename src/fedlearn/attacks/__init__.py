"""Privacy audits: gradient-inversion attacks (DLG, iDLG) on a client's FedSGD update, with and without DP."""

from fedlearn.attacks.audit import AuditResult, audit, audit_images, client_payload
from fedlearn.attacks.gradient_inversion import (
    gradients_from_vector,
    idlg_label,
    invert_gradient,
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
    "psnr",
    "recover_label",
    "save_grid",
    "to_pixels",
]
