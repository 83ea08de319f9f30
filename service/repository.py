"""Read a model repository: every model's contract, checked against its files.

The gateway and the bench call `load_repository` at start-up; a model whose
`model.onnx` no longer has the sha256 its contract records, or whose `config.pbtxt`
is not a Triton model configuration, is refused, with the reason, rather than served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2

from migserve.contract import CONFIG_FILE, CONTRACT_FILE, Contract, read_contract, sha256_file

logger = logging.getLogger(__name__)


class RepositoryError(Exception):
    """A model directory that cannot be served; the message says why."""


@dataclass(frozen=True)
class ModelEntry:
    contract: Contract
    directory: Path
    config: Any  # its config.pbtxt, parsed: Triton's ModelConfig message

    @property
    def model_path(self) -> Path:
        return self.directory / self.contract.model_file

    def __reduce__(self) -> tuple[Any, tuple[Contract, Path, bytes]]:
        """Pickled with its configuration serialised (front-end processes get their entries from the gateway's
        first process): protobuf cannot pickle tritonclient's messages, whose module it cannot import by name."""
        return _entry, (self.contract, self.directory, self.config.SerializeToString())


def _entry(contract: Contract, directory: Path, config: bytes) -> ModelEntry:
    return ModelEntry(contract, directory, model_config_pb2.ModelConfig.FromString(config))


@dataclass(frozen=True)
class Repository:
    models: dict[str, ModelEntry]
    refused: dict[str, str]  # directory name -> reason


def load_model(directory: Path) -> ModelEntry:
    """One model directory, verified: contract parses, names match, files exist, sha256 matches."""
    if not (directory / CONTRACT_FILE).is_file():
        raise RepositoryError(f"{directory}: no {CONTRACT_FILE}")
    try:
        contract = read_contract(directory)
    except (ValidationError, ValueError) as exc:
        raise RepositoryError(
            f"{directory / CONTRACT_FILE}: invalid contract: {exc.errors()[0]['msg'] if isinstance(exc, ValidationError) else exc}"
        ) from None
    if contract.name != directory.name:
        raise RepositoryError(f"{directory}: contract names model {contract.name!r}, the directory is {directory.name!r}")
    if not (directory / contract.model_file).is_file():
        raise RepositoryError(f"{directory}: {contract.model_file} is missing")
    entry = ModelEntry(contract=contract, directory=directory, config=_triton_config(directory / CONFIG_FILE))
    digest = sha256_file(entry.model_path)
    if digest != contract.model_sha256:
        raise RepositoryError(
            f"{entry.model_path}: sha256 {digest[:12]}... does not match the contract's {contract.model_sha256[:12]}...; re-export it"
        )
    return entry


def _triton_config(path: Path) -> Any:
    if not path.is_file():
        raise RepositoryError(f"{path.parent}: {CONFIG_FILE} is missing")
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(), config)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{path}: not a Triton model configuration: {exc}; re-export it") from None
    return config


def load_repository(root: Path) -> Repository:
    """Every model directory under root; hidden directories (in-progress exports) are ignored."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist; run: migserve export --all --out {root}")
    models: dict[str, ModelEntry] = {}
    refused: dict[str, str] = {}
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            models[directory.name] = load_model(directory)
        except RepositoryError as exc:
            logger.warning("refusing model: %s", exc)
            refused[directory.name] = str(exc)
    return Repository(models=models, refused=refused)
