"""The floor: messages with named arrays, their codec, flat parameter vectors, the local-training config."""

from fedlearn.protocol.codec import FORMAT_VERSION, decode, encode, wire_size
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import (
    Arrays,
    EvalResult,
    EvalTask,
    Message,
    SecureReply,
    SecureTask,
    TrainResult,
    TrainTask,
)
from fedlearn.protocol.params import ModelVector, ParamSpec

__all__ = ["FORMAT_VERSION", "Arrays", "EvalResult", "EvalTask", "LocalConfig", "Message", "ModelVector",
           "ParamSpec", "SecureReply", "SecureTask", "TrainResult", "TrainTask", "decode", "encode", "wire_size"]
