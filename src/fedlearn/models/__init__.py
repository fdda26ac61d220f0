"""Model zoo: small vision models for federated learning, all free of BatchNorm."""

from fedlearn.models.lenet import LeNet5
from fedlearn.models.mcmahan import McMahan2NN, McMahanCNN
from fedlearn.models.resnet import resnet18_gn
from fedlearn.models.seed_cnn import SeedCNN
from fedlearn.models.zoo import MODEL_DESCRIPTIONS, MODELS, build_model

__all__ = [
    "MODELS",
    "MODEL_DESCRIPTIONS",
    "build_model",
    "LeNet5",
    "McMahan2NN",
    "McMahanCNN",
    "resnet18_gn",
    "SeedCNN",
]
