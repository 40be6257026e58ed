"""Write :data:`defectforge.params.needs.NEEDS_CHECKPOINTS` from the method registry:

    python -m defectforge.params.write_needs

(after registering a method, or changing a class's ``needs_checkpoints``). No stage imports
this module: it loads every method.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from defectforge.params import needs


def declared() -> dict[str, bool]:
    """What the registered classes declare (imports every method)."""
    from defectforge.methods import get_method_class, registered_methods

    return {name: bool(get_method_class(name).needs_checkpoints) for name in registered_methods()}


def write(path: Path = Path(needs.__file__)) -> bool:
    """Rewrite :data:`NEEDS_CHECKPOINTS` from the registry; True if the file changed."""
    text = path.read_text()
    body = "".join(f'    "{name}": {flag},\n' for name, flag in declared().items())
    new = re.sub(r"(NEEDS_CHECKPOINTS: dict\[str, bool\] = \{\n).*?(\}\n# END generated)", lambda m: m.group(1) + body + m.group(2),
                 text, count=1, flags=re.S)
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    print("rewrote" if write() else "unchanged", Path(needs.__file__).name, file=sys.stderr)
