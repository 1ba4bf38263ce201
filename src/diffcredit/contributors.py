"""Contributors: who owns which training item, and the ids that name them.

Ids become path parts and TSV cells, so they are checked once, here, for everyone.
"""

from __future__ import annotations

import re

CONTRIBUTOR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def validate_contributor_id(value: object, where: str = "") -> str:
    """Return ``value`` as a contributor id, or raise ValueError naming it and the rule it breaks."""
    text = "" if value is None else str(value)
    if not CONTRIBUTOR_ID.fullmatch(text) or ".." in text:
        place = f" ({where})" if where else ""
        raise ValueError(
            f"invalid contributor id {text!r}{place}: ids must match [A-Za-z0-9][A-Za-z0-9_.-]* "
            "and may not contain '..' (no slashes, spaces or other characters); rename the contributor"
        )
    return text
