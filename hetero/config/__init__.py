"""Cluster, model and train descriptions: YAML in, frozen dataclasses out."""

from hetero.config.catalog import ChipSpec, load_catalog
from hetero.config.cluster import BridgeConfig, ClusterConfig, Coordinator, Island, NetworkConfig, Node
from hetero.config.load import Job, load_files, load_job, load_sections
from hetero.config.model import ModelConfig, Pretrained
from hetero.config.train import CheckpointConfig, DataConfig, TrainConfig

__all__ = [
    "BridgeConfig", "CheckpointConfig", "ChipSpec", "load_catalog", "ClusterConfig", "Coordinator", "DataConfig", "Island", "Job",
    "ModelConfig", "NetworkConfig", "Node", "Pretrained", "TrainConfig", "load_files", "load_job", "load_sections",
]
