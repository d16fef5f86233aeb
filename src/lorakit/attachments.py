"""One object per ``attach``: :class:`Attachment`.

Everything one ``attach(model, config, name)`` creates belongs to one :class:`Attachment`: its name, its resolved
config, its method class, the ``(path, host, adapter)`` members, the trainable module copies, the hook handles
``bind`` returned and the controller (built once, on first use). Every whole-model hook of a method receives it
(``share``, ``bind``, ``controller``, ``file_config``, ``output_loss``, ``attach_loss``, ``shared_to_file`` /
``shared_from_file``), so no method looks its siblings up again through the model.

The registry is a plain attribute of the model (``model.__dict__["_lorakit"]``): not a module, so it is invisible
to ``state_dict`` / ``save_pretrained``. This module imports nothing but :mod:`lorakit.core` pieces, so method files
can use it without importing :mod:`lorakit.inject` back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config import AttachConfig
    from .core import Adapted, Adapter

__all__ = ["Attachment", "Member", "registry", "attachments", "get_attachment"]


@dataclass(eq=False)
class Member:
    """One adapted module of an attach: its path in the model, its host and the adapter on it."""

    path: str
    host: "Adapted"
    adapter: "Adapter"
    param: str | None = None  # a parameter target: "<module path>.<parameter>" (PEFT's target_parameters key)


@dataclass(eq=False)
class Attachment:
    """Everything one ``attach`` created. Hooks receive it; users get it from :func:`lorakit.attachment`."""

    name: str
    config: "AttachConfig"
    method: type
    model: nn.Module
    members: list[Member] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)  # paths of the ModulesToSave copies it owns
    # trainable token rows (lorakit.tokens.TrainableTokens on the embedding and a head tied to it): hosted like the
    # members but not the method's adapters, so method hooks never see them
    token_members: list[Member] = field(default_factory=list)
    handles: list = field(default_factory=list)  # what ``bind`` returned (removed by detach)
    _controller: Any = None
    _controller_built: bool = False

    # --- views -----------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list["Adapter"]:
        return [m.adapter for m in self.members]

    @property
    def active_adapters(self) -> list["Adapter"]:
        """The adapters of members whose host runs this attach now (not merged, name active)."""
        return [m.adapter for m in self.members if self.name in m.host.active]

    @property
    def all_members(self) -> list[Member]:
        """The method's members and the trainable-token members (everything installed on hosts)."""
        return self.members + self.token_members

    @property
    def paths(self) -> list[str]:
        """The adapted modules (``target_modules``); parameter targets are in :attr:`param_targets`."""
        return [m.path for m in self.members if m.param is None]

    @property
    def param_targets(self) -> list[str]:
        """The adapted parameters, ``"<module path>.<parameter>"`` (PEFT's ``target_parameters``)."""
        return [m.param for m in self.members if m.param is not None]

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def of_type(self, cls: type) -> list["Adapter"]:
        return [a for a in self.adapters if isinstance(a, cls)]

    def method_config(self, path: str | None = None) -> Any:
        """The method's Config for ``path`` (None: the attach-wide defaults, without per-module overrides)."""
        return self.config.method_config(path, self.method)

    @property
    def active(self) -> bool:
        return self.name in registry(self.model).get("active", ())

    # --- the controller, built once per attach --------------------------------------------------------------
    def controller(self) -> Any:
        """The method's :class:`lorakit.controllers.Controller` for this attach (built on first call), or None."""
        if not self._controller_built:
            self._controller = self.method.controller(self)
            self._controller_built = True
        return self._controller

    def __getitem__(self, key: str) -> Any:  # the dict shape ``attached()`` returned before (config/paths/handles)
        if key in ("config", "paths", "handles"):
            return getattr(self, key)
        raise KeyError(key)

    def __repr__(self) -> str:
        return f"Attachment(name={self.name!r}, method={self.method.name!r}, modules={len(self.members)})"


def registry(model: nn.Module) -> dict:
    """The model's lorakit book-keeping (created empty on first use)."""
    d = model.__dict__.get("_lorakit")
    if d is None:
        from .core import BatchContext

        d = {"attachments": {}, "ctx": BatchContext(), "bias_stash": {}, "active": (), "grad_flags": None}
        model.__dict__["_lorakit"] = d
    return d


def attachments(model: nn.Module) -> dict[str, Attachment]:
    """``{name: Attachment}`` in attach order."""
    d = model.__dict__.get("_lorakit")
    return d["attachments"] if d is not None else {}


def get_attachment(model: nn.Module, name: str = "default") -> Attachment:
    att = attachments(model).get(name)
    if att is None:
        raise ConfigError(f"no adapter named {name!r}; attached: {sorted(attachments(model))}")
    return att
