"""The update pipeline: transforms a client applies, in order, to the arrays it sends (clip, noise, ...)."""

from fedlearn.transforms.base import TransformContext, UpdateTransform, build_transforms, joint_norm
from fedlearn.transforms.clip import Clip
from fedlearn.transforms.noise import GaussianNoise

__all__ = ["Clip", "GaussianNoise", "TransformContext", "UpdateTransform", "build_transforms", "joint_norm"]
