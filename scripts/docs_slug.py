"""GitHub's heading anchors for the mkdocs build (docs/*.md link to sections the way GitHub
renders them, e.g. "§1 CLIP / symmetric InfoNCE" → "1-clip--symmetric-infonce").

GitHub: lower-case, drop every character that is not a letter, digit, space, hyphen or
underscore, then turn each space into a hyphen (runs are not collapsed).
"""
import re
import unicodedata


def github_slug(value: str, separator: str = "-") -> str:
    value = unicodedata.normalize("NFKC", value).strip().lower()
    value = re.sub(r"[^\w\- ]", "", value)
    return value.replace(" ", separator)
