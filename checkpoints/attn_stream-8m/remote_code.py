"""Write a model's source next to its weights, so `trust_remote_code=True` loads it without amformers.

transformers' own `register_for_auto_class` copies only files that sit in the same folder as the model
file. Our package keeps configurations, models and kernels in separate folders, so we flatten the
model's module and every module it imports relatively into one folder, rewriting each relative
import to a sibling import (`from ..configuration.configuration_x import X` -> `from .configuration_x
import X`). The flattened files are themselves valid input, so a model loaded through remote code
saves again the same way. Standard library only: this file ships inside every checkpoint.
"""

import ast
import re
from pathlib import Path

_RELATIVE_FROM = re.compile(r"^(\s*)from\s+\.+([\w.]+)\s+import\b", flags=re.MULTILINE)


def _relative_imports(path: Path) -> list[Path]:
    """Files of the modules that `path` imports relatively (`from .a.b import c` -> a/b.py)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if not node.module:
                raise ValueError(
                    f"{path}: `from {'.' * node.level} import ...` cannot be flattened for remote code; "
                    "import from the module by name instead."
                )
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            target = base.joinpath(*node.module.split(".")).with_suffix(".py")
            if not target.is_file():
                raise ValueError(f"{path}: relative import `{node.module}` is not a module file ({target}).")
            found.append(target)
    return found


def flatten_module_sources(module_file: str | Path) -> dict[str, str]:
    """Map flat file name -> source text for `module_file` and everything it imports relatively."""
    pending, sources = [Path(module_file).resolve()], {}
    while pending:
        path = pending.pop()
        if path.name in sources:
            continue
        text = path.read_text(encoding="utf-8")
        sources[path.name] = _RELATIVE_FROM.sub(lambda m: f"{m.group(1)}from .{m.group(2).split('.')[-1]} import", text)
        pending.extend(_relative_imports(path))
    return sources


def write_remote_code(save_directory: str | Path, model_class: type, config, auto_classes: dict[str, type]) -> None:
    """Copy the flattened sources of `model_class` into `save_directory` and point `config.auto_map` at them.

    `auto_classes` maps an Auto class name ("AutoModelForCausalLM") to the class it should load.
    """
    import sys

    # A wrapper may have subclassed the model (FSDP2's `fully_shard` does): use the class from the model file.
    model_module = next(iter(auto_classes.values())).__module__
    model_class = next((c for c in model_class.__mro__ if c.__module__ == model_module), model_class)
    module_file = sys.modules[model_class.__module__].__file__
    sources = flatten_module_sources(module_file)
    config_file = Path(sys.modules[type(config).__module__].__file__).name
    if config_file not in sources:
        raise ValueError(f"{module_file} must import its configuration class relatively to ship as remote code.")
    Path(save_directory).mkdir(parents=True, exist_ok=True)
    for name, text in sources.items():
        (Path(save_directory) / name).write_text(text, encoding="utf-8")
    auto_map = {"AutoConfig": f"{Path(config_file).stem}.{type(config).__name__}"}
    for auto_name, cls in auto_classes.items():
        auto_map[auto_name] = f"{Path(sys.modules[cls.__module__].__file__).stem}.{cls.__name__}"
    config.auto_map = auto_map


class SavesRemoteCode:
    """Mixin placed before `PreTrainedModel`: `save_pretrained` also writes the model's flattened source and points
    `config.auto_map` at it, so `trust_remote_code=True` loads the folder. The model names its Auto classes in
    `remote_code_classes()`."""

    def remote_code_classes(self) -> dict[str, type]:
        raise NotImplementedError(f"{type(self).__name__} must name the classes its remote code provides.")

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        if is_main_process:
            write_remote_code(save_directory, type(self), self.config, self.remote_code_classes())
        return super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)


def refresh_remote_code(save_directory: str | Path, model_class: type) -> list[str]:
    """Rewrite the code files of a saved folder from the installed source (weights and config untouched) and remove
    `.py` files the model no longer imports, so a shipped checkpoint's remote code follows the package's fixes.
    Returns the names written."""
    import sys

    sources = flatten_module_sources(sys.modules[model_class.__module__].__file__)
    for path in Path(save_directory).glob("*.py"):
        if path.name not in sources:
            path.unlink()
    for name, text in sources.items():
        (Path(save_directory) / name).write_text(text, encoding="utf-8")
    return sorted(sources)
