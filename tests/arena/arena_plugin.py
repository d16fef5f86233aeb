"""An arena plugin for the tests: registers a method whose forward fails (imported by the arena and its runs)."""
from dataclasses import dataclass

from lorakit.core import register
from lorakit.methods.lora import LoRA


@dataclass
class _Cfg(LoRA.Config):
    pass


@register("broken_test", family="test", paper="none")
class Broken(LoRA):
    Config = _Cfg
    peft = None

    def forward(self, x, y):
        raise RuntimeError("deliberately broken")
