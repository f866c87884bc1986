"""English inflection for WordNet lookups: undoing an inflection to find the lemma (nltk's
morphological rules) and re-applying it to a substitute, so "loved" gets "adored", not "adore".
"""

from __future__ import annotations

# nltk's wordnet.MORPHOLOGICAL_SUBSTITUTIONS (same order), with the inflection each rule undoes.
RULES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "n": (
        ("s", "", "plural"), ("ses", "s", "plural"), ("ves", "f", "plural"),
        ("xes", "x", "plural"), ("zes", "z", "plural"), ("ches", "ch", "plural"),
        ("shes", "sh", "plural"), ("men", "man", "plural"), ("ies", "y", "plural"),
    ),
    "v": (
        ("s", "", "3sg"), ("ies", "y", "3sg"), ("es", "e", "3sg"), ("es", "", "3sg"),
        ("ed", "e", "past"), ("ed", "", "past"), ("ing", "e", "ing"), ("ing", "", "ing"),
    ),
    "a": (
        ("er", "", "comparative"), ("est", "", "superlative"),
        ("er", "e", "comparative"), ("est", "e", "superlative"),
    ),
    "r": (),
}  # fmt: skip
VOWELS = frozenset("aeiou")
# Suffix -> inflection class for irregular (.exc-listed) forms with a regular-looking ending.
EXC_SUFFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "v": (("ing", "ing"), ("ed", "past")),
    "a": (("est", "superlative"), ("er", "comparative")),
}


def regular_inflection(word: str, cls: str) -> str:
    """English spelling rules for plural/3rd-person -s, -ed and -ing (no consonant doubling;
    doubled forms come from WordNet's .exc lists first)."""
    consonant_y = len(word) > 1 and word[-1] == "y" and word[-2] not in VOWELS
    if cls in ("plural", "3sg"):
        if word.endswith(("s", "x", "z", "ch", "sh")):
            return word + "es"
        return word[:-1] + "ies" if consonant_y else word + "s"
    if cls == "past":
        if word.endswith("e"):
            return word + "d"
        return word[:-1] + "ied" if consonant_y else word + "ed"
    if cls == "ing":
        if word.endswith("ie"):
            return word[:-2] + "ying"
        if word.endswith("e") and not word.endswith(("ee", "ye", "oe")) and len(word) > 2:
            return word[:-1] + "ing"
        return word + "ing"
    raise ValueError(cls)


def restore_case(original: str, text: str) -> str:
    """`text` in the case pattern of `original` (UPPER, Capitalised or as is)."""
    if original.isupper() and len(original) > 1:
        return text.upper()
    if original[:1].isupper():
        return text[:1].upper() + text[1:]
    return text
