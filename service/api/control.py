"""Triton's model repository extension in explicit mode (`serve --model-control-mode explicit`): load a model, or
load it again from its files, and unload it, over both protocols. One load or unload at a time (Gateway.control)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import repository
from ..config import ServeConfig
from ..errors import BadRequest
from ..placement import footprint, place_one, why_nowhere
from ..repository import RepositoryError
from .frontends import ServeModel, UnserveModel

if TYPE_CHECKING:
    from .gateway import Gateway

logger = logging.getLogger(__name__)


async def load_model(gateway: Gateway, name: str, parameters: dict[str, Any]) -> None:
    """Triton's model repository extension, explicit mode: read the model's directory again and serve it on every
    local partition with room. A served model is swapped in place (its files may have changed); if every partition
    refuses the new version, the running one serves on."""
    _check_control(gateway.config, f"load '{name}'")
    if parameters:
        raise BadRequest(
            f"failed to load '{name}': parameters {sorted(parameters)} are not supported; "
            f"the gateway loads the files in {gateway.config.model_repo / name} as they are"
        )
    async with gateway.control:
        directory = _model_dir(gateway.config, name)
        if directory is None:
            raise BadRequest(f"failed to load '{name}': no such model in {gateway.config.model_repo}")
        try:
            entry = repository.load_model(directory)
        except RepositoryError as exc:
            if name not in gateway.models:  # a served model serves on from its old files
                gateway.not_served[name] = str(exc)
            raise BadRequest(f"failed to load '{name}': {exc}") from None
        specs = place_one(gateway.partitions, gateway.placement, entry, gateway.cpu_memory)
        if not specs:
            gateway.not_served[name] = why_nowhere(gateway.partitions, gateway.placement, footprint(entry), gateway.cpu_memory, name)
            raise BadRequest(f"failed to load '{name}': {gateway.not_served[name]}")
        outcome = await gateway.backend.load_model(specs)  # a served model is swapped in place, between batches
        loaded = {pid: specs[pid] for pid, why in outcome.items() if why is None}
        refusals = "; ".join(f"partition {pid} refused it: {why}" for pid, why in outcome.items() if why is not None)
        if not loaded:
            if name not in gateway.models:
                gateway.not_served[name] = refusals
            raise BadRequest(
                f"failed to load '{name}': {refusals}" + (" (the running version serves on)" if name in gateway.models else "")
            )
        left_out = gateway.local_partitions(name) - loaded.keys()  # a reload they did not take: they drop the old version
        gateway.placed(name, entry, loaded)
        if gateway.frontends is not None:  # each stops sending batches to the partitions left out before they drop it
            column = None if gateway.shared is None else gateway.shared.columns.get(name)  # given as placed() served it
            await gateway.frontends.tell(ServeModel(name, entry, loaded, column), gateway.config.default_timeout_s)
        logger.info("loaded model %s on %s%s", name, ", ".join(loaded), f" ({refusals})" if refusals else "")
        async with gateway.loaded:
            gateway.loaded.notify_all()
        if left_out:
            await gateway.backend.unload_model(name, sorted(left_out))
            logger.warning(
                "model %s: partitions %s ran the previous version and do not run the new one (%s): dropped it there, "
                "so every answer comes from the new version",
                name,
                ", ".join(sorted(left_out)),
                refusals or "no memory left for it",
            )


async def unload_model(gateway: Gateway, name: str, parameters: dict[str, Any]) -> None:
    """Stop serving a model: new requests get 404, accepted ones are answered first. Unloading a model of the
    repository that is not served does nothing, as in Triton."""
    _check_control(gateway.config, f"unload '{name}'")
    dependents = parameters.get("unload_dependents", False)
    if not isinstance(dependents, bool) or set(parameters) - {"unload_dependents"}:
        raise BadRequest(f"failed to unload '{name}': the only parameter is unload_dependents (true or false), not {parameters}")
    async with gateway.control:
        if name not in gateway.models:
            if _model_dir(gateway.config, name) is None:
                raise BadRequest(f"failed to unload '{name}': no such model in {gateway.config.model_repo}")
            return
        reason = f"unloaded; POST /v2/repository/models/{name}/load serves it again"
        if gateway.frontends is not None:  # they stop sending its batches before the workers drop it
            await gateway.frontends.tell(UnserveModel(name, reason), gateway.config.default_timeout_s + 5)
        await gateway.unserve(name)
        gateway.not_served[name] = reason
        logger.info("unloaded model %s", name)


def _model_dir(config: ServeConfig, name: str) -> Path | None:
    """The model's directory in the repository, if `name` names one (hidden ones are exports in progress)."""
    if not name or name.startswith(".") or "/" in name:
        return None
    directory = config.model_repo / name
    try:
        return directory if directory.is_dir() else None
    except (OSError, ValueError):  # a name too long for the file system, or holding NUL
        return None


def _check_control(config: ServeConfig, what: str) -> None:
    if config.model_control_mode != "explicit":
        raise BadRequest(
            f"cannot {what}: the gateway runs with --model-control-mode none and serves the models it started with; "
            "start it with --model-control-mode explicit to load and unload models"
        )
