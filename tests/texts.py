"""Natural text for parity tests (written for this project)."""

TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. Within "
    "fifty years, printing shops had spread to more than two hundred cities across Europe, and the "
    "cost of books fell sharply, which helped literacy and the spread of new ideas in science and "
    "religion. Pamphlets, newspapers and scientific journals followed, and by the eighteenth century "
    "a reading public had formed that no ruler could fully control. Historians still argue about how "
    "quickly these changes reached ordinary people in the countryside.",
    "To make a simple loaf of bread, mix five hundred grams of flour with ten grams of salt, seven "
    "grams of dried yeast and about three hundred and fifty millilitres of warm water. Knead the dough "
    "for ten minutes until it is smooth and elastic, then leave it in a covered bowl until it has "
    "doubled in size, which takes about an hour in a warm kitchen. Shape it into a loaf, let it rise "
    "again for thirty minutes, and bake it at two hundred and twenty degrees for half an hour.",
    "def fibonacci(n):\n    \"\"\"Return the first n Fibonacci numbers as a list.\"\"\"\n    result = []\n"
    "    a, b = 0, 1\n    for _ in range(n):\n        result.append(a)\n        a, b = b, a + b\n"
    "    return result\n\n\nif __name__ == \"__main__\":\n    for i, value in enumerate(fibonacci(20)):\n"
    "        print(f\"F({i}) = {value}\")\n\n\n# Expected output starts with F(0) = 0, F(1) = 1, F(2) = 1.\n",
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light energy "
    "into chemical energy. In the chloroplasts, chlorophyll absorbs mostly blue and red light; the "
    "energy splits water molecules, releasing oxygen as a by-product, and drives the production of "
    "ATP and NADPH. These molecules then power the Calvin cycle, in which carbon dioxide from the air "
    "is fixed into three-carbon sugars that the plant uses to build glucose, starch and cellulose. "
    "Almost all life on Earth depends on this process, directly or indirectly, for food and for the "
    "oxygen in the air.",
]


def licence_text() -> str:
    """A real text of several thousand tokens: the GNU GPL v3, as Debian's essential `base-files`
    package installs it (35 kB, about 7,600 SmolLM2 tokens); else the licence file jaxlib ships in
    its wheel (a dependency of jaxllama, so on every machine that runs these tests). Expected values
    are always computed live, so which of the two is used changes no assertion."""
    from importlib import metadata
    from pathlib import Path

    gpl = Path("/usr/share/common-licenses/GPL-3")
    if gpl.is_file():
        return gpl.read_text(encoding="utf-8")
    files = [f for f in metadata.files("jaxlib") or [] if f.name.upper().startswith("LICENSE")]
    assert files, "no licence text found: neither /usr/share/common-licenses/GPL-3 nor jaxlib's LICENSE"
    return Path(files[0].locate()).read_text(encoding="utf-8", errors="replace")
