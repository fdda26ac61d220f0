"""Federated face recognition: a federated embedding backbone with identity heads that never leave a party."""

from fedlearn.faces.config import FaceConfig
from fedlearn.faces.data import FaceImages, load_faces
from fedlearn.faces.evaluate import embed, open_set_report
from fedlearn.faces.metrics import pair_scores, rank_k_identification, roc_auc, tar_at_far
from fedlearn.faces.model import FaceEmbeddingNet
from fedlearn.faces.split import IdentitySplit, gallery_probe_split, party_client_data, split_identities
from fedlearn.faces.strategy import CodebookFedAvg, PrivateHeadFedAvg
from fedlearn.faces.templates import head_from_state, head_state, public_codebook
from fedlearn.faces.trainer import PrivateHeadTrainer

__all__ = [
    "CodebookFedAvg",
    "FaceConfig",
    "FaceEmbeddingNet",
    "FaceImages",
    "head_from_state",
    "head_state",
    "IdentitySplit",
    "PrivateHeadFedAvg",
    "PrivateHeadTrainer",
    "embed",
    "gallery_probe_split",
    "load_faces",
    "open_set_report",
    "pair_scores",
    "party_client_data",
    "public_codebook",
    "rank_k_identification",
    "roc_auc",
    "split_identities",
    "tar_at_far",
]
