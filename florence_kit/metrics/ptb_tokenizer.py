"""Caption tokens as the COCO caption evaluation sees them: Penn Treebank tokens, lower-cased, punctuation dropped.

pycocoevalcap tokenises every caption with Stanford's PTBTokenizer (``-preserveLines -lowerCase``, one caption per
line of one file) and then drops the tokens ``'' ' `` ` . ? ! , : ; - -- ...``. This module implements the same
Penn Treebank conventions in Python, so BLEU-4 / CIDEr-D need no Java:

- words keep internal hyphens, periods, ampersands and apostrophes (``black-and-white``, ``u.s.``, ``at&t``,
  ``o'clock``); clitics split off (``do n't``, ``it 's``, ``should n't 've``, ``can not``, ``gon na``);
- numbers keep their commas, points, colons and slashes (``1,234.50``, ``3:30``, ``12/25/2020``); a fraction
  after a whole number joins it with a no-break space (``5\\u00a01/2``); currency signs split off and are
  normalised (``£`` → ``#``, ``€`` → ``$``, ``¢`` → ``cents``);
- a period ending a word splits off unless the word is a known abbreviation or an initialism;
- brackets become ``-LRB-`` ``-RRB-`` ``-LSB-`` ``-RSB-`` ``-LCB-`` ``-RCB-`` (here lower-cased), also inside a
  token; quotes become `````` / ``''`` and dashes ``--``, which the punctuation filter then drops;
- URLs, e-mail addresses, SGML tags, emoticons and telephone numbers stay whole;
- characters outside the Basic Multilingual Plane (emoji) are deleted, as are control characters;
- the captions are one text, as in the reference's file: "I." at a caption's end is "i" before a caption opening a
  sentence ("The ...") and "i." before one that does not.

Tokens are read longest match first from an ordered set of token classes (the earlier class on a tie). The tables
below (abbreviations, sentence starters, words spelt with an apostrophe) hold what the reference's output shows.
Rule by rule, the behaviour was checked against the tokens the reference (pycocoevalcap 1.2, Stanford
PTBTokenizer 3.4.1 via Java) recorded for the captions in tests/fixtures/captions/: identical for 8,087 of 8,089,
the other two being random runs of edge-case pieces (``a.m.1,000e-mail``, ``fig..com-7``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Tokens pycocoevalcap removes after tokenising (its punctuation list, as applied to lower-cased output).
DROPPED = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# Letters of any script; digits other than 0-9 (superscripts, subscripts, vulgar fractions) and characters outside
# the Basic Multilingual Plane are not letters here.
_LETTER_CLASS = r"[^\W\d_\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\U00010000-\U0010ffff]"
_L = rf"(?:{_LETTER_CLASS}|[\u0300-\u036f])"  # a letter (any script), combining accents included
_A = rf"(?:{_L}|[0-9])"  # a letter or digit
_SP = r"[ \t\u00a0\u3000\u2000-\u200a\u202f\u205f]"

# Abbreviations whose period belongs to the word (compared lower-cased). Titles and the like, which a name follows:
TITLE_ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "dr", "st", "mt", "ft", "vs", "gov", "sen", "rep", "gen", "lt", "col", "capt", "sgt", "prof",
    "rev", "messrs", "ave", "dept", "natl", "ph", "cont'd",
))
# ... and those that often end a sentence (company, state, month and day names): "Ariz.a" is "Ariz." then "a".
END_ABBREVIATIONS = frozenset((
    "jr", "sr", "etc", "inc", "co", "corp", "ltd", "pty", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec", "mon", "tue", "tues", "wed", "thu", "thur", "thurs", "fri", "sat", "sun", "calif",
    "mass", "ariz", "wash", "mo", "ill", "pa", "bldg", "univ", "est", "tel", "sq", "al", "esq", "ph.d", "ed.d",
))
ABBREVIATIONS = TITLE_ABBREVIATIONS | END_ABBREVIATIONS
# Abbreviations that keep their period only before a number ("No. 5", "fig. 3", "pp. 4-5"; "no . x").
NUMBER_ABBREVIATIONS = frozenset(("no", "fig", "pp", "ca"))
# Words spelt with an apostrophe that stay whole (compared case-insensitively).
APOSTROPHE_WORDS = ("dunkin'", "c'mon", "c'est", "cap'n", "li'l", "nor'easter", "cont'd", "ma'am", "o'o")
# After a one-letter initial ("A.") one of these words, capitalised, starts a new sentence: the period splits off.
SENTENCE_STARTERS = frozenset((
    "the", "a", "an", "he", "she", "it", "we", "they", "you", "in", "this", "but", "there", "her", "our", "their",
    "that", "these", "what", "when", "if", "at", "as", "after", "yet", "so", "some", "many", "one", "then", "now",
    "here", "however", "since", "while", "about", "more", "such", "other", "once", "last", "according", "mr.", "ms.",
))

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&apos;": "'", "&quot;": "''", "&mdash;": "--",
             "&ndash;": "--", "&nbsp;": ""}
_CURRENCY = {"£": "#", "€": "$", "¢": "cents"}
_FRACTIONS = {"½": "1/2", "¼": "1/4", "¾": "3/4", "⅓": "1/3", "⅔": "2/3"}

# Whole-word splits (assimilations): the first part's length.
_ASSIMILATIONS = {"cannot": 3, "gonna": 3, "wanna": 3, "gotta": 3, "lemme": 3, "gimme": 3}

# A run of letters and digits. A soft hyphen inside it is deleted later; a character entity other than those the
# tokenizer maps ("&eacute;") counts as a letter, and so does a combining accent, though neither straight after a digit.
_ENTITY_LETTER = r"&(?!(?i:amp|lt|gt|apos|quot|nbsp|mdash|ndash);)[a-zA-Z]+;"
_SEG = re.compile(rf"(?:\u00ad*{_A}|{_ENTITY_LETTER})"
                  rf"(?:{_LETTER_CLASS}|[0-9]|(?<![0-9])[\u0300-\u036f]|\u00ad|(?<![0-9]){_ENTITY_LETTER})*")
_IS_LETTER = re.compile(_L)
_MARKS = "".join(map(chr, range(0x300, 0x370)))  # combining accents: a word opening with one takes no hyphen
_LEADING_LETTERS = re.compile(rf"{_L}+")
_IS_VOWEL_BEFORE = re.compile(r"[aeiouyAEIOUY]")
_IS_VOWEL_AFTER = re.compile(r"[aeiouA-Z]")
_CLITICS = frozenset(["s", "d", "m", "ll", "re", "ve"])
_NT = re.compile(r"[nN]'[tT]")
# After an abbreviation that ends sentences, "." and one letter join it only when the word goes on after the letter:
_ONE_LETTER_GOES_ON = re.compile(r"-?[A-Za-z0-9]|\.[A-Za-z]|(?<=[A-Z])'(?i:s|d|m|re|ve|ll)(?![A-Za-z])"
                                 r"|(?<=[a-ce-ik-mo-xz])'[A-Za-z]|(?<=n)'(?![tT])[A-Za-z]")
_DOTTED_PART = re.compile(r"[A-Za-z0-9]+\.[A-Za-z]")
_DIGITS_THEN_HYPHEN = re.compile(r"[0-9]+(?:\.[0-9]+)?-[0-9A-Za-z]")
_ASCII_WORD = re.compile(r"[A-Za-z]+")
_ASCII_ALNUM = re.compile(r"[A-Za-z0-9]+")
_ASCII_SLASHED = re.compile(r"[A-Za-z0-9/]+")


def _joins_apostrophe(head: str, rest: str) -> bool:
    """Whether an apostrophe between ``head`` and ``rest`` (letters and digits) stays inside one word: after one
    letter (d l n o, or a capital but I and Y) before two letters ("o'clock", "O'Brien", "d'Artagnan"), or between
    vowels of a longer word ("ma'am"); never before a clitic ("we'll", "HE'S", "X'll1")."""
    before, after = head[-1], rest[0]
    if len(head) == 1 and before in "oO":  # "o'clock", "o'93"
        return len(rest) > 1 and rest.lower() not in _CLITICS
    letters = _LEADING_LETTERS.match(rest)
    if not letters or (rest if head in ("d", "l") else letters.group()).lower() in _CLITICS:
        return False
    if len(head) == 1 and (before in "dln" or ("A" <= before <= "Z" and before not in "IY")):
        return len(rest) > 1 and rest[:2].isalpha()
    return (len(head) > 1 and head.isalpha() and _IS_VOWEL_BEFORE.match(before) is not None
            and _IS_VOWEL_AFTER.match(after) is not None)


def _match_word(text: str, pos: int) -> int:
    """End of the word starting at ``pos`` (or -1): letters and digits, joined by the characters words keep."""
    m = _SEG.match(text, pos)
    if not m:
        return -1
    end = m.end()
    hyphenated = dotted = banged = apostrophed = underscored = slashed = False
    while end < len(text):
        c = text[end]
        dot_dash = text.startswith(".-", end) and _IS_LETTER.match(text, end + 2) is not None
        nxt = _SEG.match(text, end + 2 if dot_dash else end + 1)
        if not nxt:
            break
        before, after = text[end - 1], text[end + 1]
        if c in "-\u2011\u058a":  # also the no-break and Armenian hyphens
            if banged or slashed or text[pos] in _MARKS:
                break
            if dotted:  # "Prof.mother-in-law": ASCII only
                if not text[pos:end].isascii():
                    break
                nxt = _ASCII_ALNUM.match(text, end + 1)
                if not nxt:
                    break
            hyphenated = True
        elif c == "/":  # "100km/h", "12/25/20": ASCII letters and digits only
            if not (_ASCII_SLASHED.fullmatch(text, pos, end) or (dotted and _DOTTED_PART.match(text, end + 1))):
                break  # (after a dotted part, only a dotted part: "coco.org/img.jpg")
            nxt = _ASCII_ALNUM.match(text, end + 1)
            if not nxt:
                break
            slashed = True
        elif c == "_":
            if dotted or slashed:
                break
            underscored = True
        elif dot_dash:
            if text[pos:end].lower() in END_ABBREVIATIONS and nxt.end() == end + 3:
                break  # "Inc.-a": the abbreviation, then the rest
            hyphenated = True
        elif c in "!?":  # "park!the": between letters, in a word that starts with one
            if hyphenated or dotted or apostrophed or not (_IS_LETTER.match(text[pos]) and _IS_LETTER.match(after)):
                break
            banged = True
        elif c == ".":
            if apostrophed or underscored:
                break
            if (text[pos:end].lower() in END_ABBREVIATIONS and nxt.end() == end + 2
                    and not _ONE_LETTER_GOES_ON.match(text, end + 2)):
                break  # "Ariz.a": the abbreviation, then a one-letter word
            if hyphenated:  # "non-U.S.": an initialism after a hyphen
                if not (_IS_LETTER.match(before) and (end - pos < 2 or text[end - 2] in "-.")
                        and nxt.end() == end + 2 and text.startswith(".", end + 2)):
                    break
            elif before.isdigit() and _DIGITS_THEN_HYPHEN.match(text, end + 1):
                pass  # "T2.5-metre"
            elif not (_IS_LETTER.match(text[pos]) and _IS_LETTER.match(before) and (
                    _IS_LETTER.match(after) or _DIGITS_THEN_HYPHEN.match(text, end + 1))):
                break
            dotted = True
        elif c in "'‘’`":
            head, rest = text[pos:end], text[end + 1 : nxt.end()]
            hyphen = text.rfind("-", pos, end)  # "Ærø-O'Brien": one letter after a hyphen (not after ".-")
            if not (_joins_apostrophe(head, rest) or (
                    hyphen == end - 2 and text[hyphen - 1] != "." and _joins_apostrophe(text[end - 1], rest))):
                break
            apostrophed = True
            if head not in ("d", "l"):  # "O'Brien", "n'tx": letters (after o, letters and digits), and the word ends
                return _SEG.match(text, end + 1).end() if head in "oO" else _LEADING_LETTERS.match(text, end + 1).end()
        else:
            break
        end = nxt.end()
    # a word before n't ends before its n ("is|n't", "ca|n't")
    if (end - pos > 1 and _NT.match(text, end - 1) and _ASCII_WORD.fullmatch(text, pos, end)
            and text[end - 2] not in "nN"):
        end -= 1
    return end


_SPECIAL_WORDS = {
    "c++": re.compile(r"[cC]\+\+"),
    "c#": re.compile(r"[cCfF]#"),
    "ampersand": re.compile(r"S&Ls|[A-Z]+(?:(?:&|&amp;)[A-Z]+)+(?:s(?![A-Za-z]))?(?:-[0-9]{3})?"),
    "digits": re.compile("[\u00b2\u00b3\u00b9\u2070-\u209f]+"),
    "bracket_word": re.compile(r"-[LR][RSC]B-"),
    "prefix": re.compile(r"(?i:pro|anti)-"),
    "soft_hyphen": re.compile("\u00ad"),
}


def _rules() -> list[tuple[str, re.Pattern[str]]]:
    rules = [
        ("space", rf"(?:{_SP}|[\u200b\ufeff\u2011\u058a\x00-\x08\x0e-\x1f\x7f])+"),
        ("newline", r"\n"),
        ("sgml", r"<!--[^<>\n]*-->|</?[A-Za-z][A-Za-z0-9:_-]*"
                 r"(?:[ \t]+[A-Za-z_:][-\w:.]*(?:[ \t]*=[ \t]*(?:\"[^\"<>\n]*\"|'[^'<>\n]*'|[^\s<>'\"]+))?)*[ \t]*/?>"),
        ("url", r"(?i:https?|ftp)://[^ \t\n\r\f\v<>{}()\"|]+[^ \t\n\r\f\v<>{}()\"|.,!?-]"),
        ("email", r"[A-Za-z0-9][^\s@<>(){}\[\]\"]*@[^\s@<>(){}\".][^\s@<>(){}\"]*(?<!\.)"),
        ("handle", rf"#{_LETTER_CLASS}+|@[A-Za-z_][A-Za-z0-9_]*|@+"),
        ("entity", r"&(?:[a-zA-Z]+|#[0-9]+);"),
        ("emoticon", r"[<>]?[:;=][-o*']?[)\](\[dDpPO{@|\\](?![A-Za-z0-9])|\(?[\^xoO~-]_[\^xoO~-]\)?"),
        ("phone", r"\(\d{3}\) ?\d{3}-\d{4,5}|\+\d{1,3}(?: \d{2,4}){1,2} \d{4}|\d{2,4}[ -]\d{3,4}[ -]\d{4}"
                  r"|\d{3}-\d{4}|\d-\d{3}-\d{3}-\d{4}|\d{3}\.\d{3}\.\d{4}"),
        ("fraction", r"\d+ \d+/\d+"),
        ("number", r"[-+]?(?:\d+(?:[,.:]\d+)*|\d+(?:/\d+)+|[.,:]\d+(?:[,.:]\d+)*)"),
        ("numword", rf"\d+(?:[.,/]\d+)+{_A}*(?:-{_L}+)+"),
        ("file_name", rf"{_A}+\.(?:txt|jpg)(?![A-Za-z0-9])"),
        ("apostrophe_word", r"(?i:cont'd\.|dunkin'(?![dD])|" + "|".join(APOSTROPHE_WORDS[1:]) + ")"),
        ("clitic", r"(?i)(?:'(?:s|m|d|re|ve|ll|n)|n't)(?![a-z])|’(?i:s|m|d|re|ve|ll)"),
        # 't (before is/was), 'em, 'til, 'cause, 'n', '90s; and d' l' j' y' unless a clitic follows ("d're")
        ("clitic_word", r"['’](?i:t(?=is|was)|em|till?|cause|n'|[0-9]{2}(?:s|(?=\s|$)))|'[nN](?![A-Za-z])|’[nN]"
                        r"|(?:[dDlL]['’]|[jJ]['’](?![sdmSDM])|[yY]['’](?=[A-Za-z]))(?!(?i:s|d|m|re|ve|ll)(?![A-Za-z]))"),
        ("ellipsis", r"\.\.\.+|…|\u0085"),
        ("dash", r"-{2,}|[—–]"),
        ("quote", r"``|''|[\"`']"),
        ("unicode_quotes", r"`?[“”«»‘’]`?[“”«»‘’]*"),
        ("bang", r"[!?]+"),
        ("stars", r"\*+|_+|\\\*|<<|>>|##+"),
        ("bracket", r"[()\[\]{}]"),
        ("currency", r"[A-Z]{1,3}\$|[$£€¢¥#]"),
        ("dotcom", r"(?:\u00a0|[^\sA-Za-z0-9$.,;:!?()\[\]{}<>\"'`@/\\=|^’»…-])(?:\u00a0|[^\s0-9$.,;()\[\]{}<>\"'`@-])*?"
                   r"\.com|[A-Za-z][A-Za-z0-9’]*\.com|[a-z][a-z0-9’]*\u00a0+\.com"),
        ("astral", r"[\U00010000-\U0010ffff]+"),
        ("fraction_char", "[½¼¾⅓⅔]"),
        ("other", r"[^\s\ud800-\udfff]"),
    ]
    compiled = [(name, re.compile(pattern)) for name, pattern in rules]
    return compiled[:10] + list(_SPECIAL_WORDS.items()) + compiled[10:]


_RULES = _rules()
_LINE_BREAKS = str.maketrans(dict.fromkeys("\n\r\u000b\u000c\u2028\u2029", " "))  # one caption stays one line
_BLANKS = dict(_RULES)["space"]
_QUOTE_MAP = str.maketrans({"“": "``", "«": "``", "”": "''", "»": "''", "‘": "`", "’": "'"})
_NEXT_WORD = re.compile(r"\s+([A-Z][\w.]*?)(?:(?<=[rs]\.)|(?![\w.]))(?=\s|$)|\s+<[A-Za-z/!][^<>]*>(?=\s)")
_INITIALISM = re.compile(r"(?:[A-Za-z]\.)+")
_CLITIC_AHEAD = re.compile(r"['’](?i:s|d|m|re|ve|ll)(?![A-Za-z])")
_NUMBER_AHEAD = re.compile(r"\s?[.,:]?\d|[,:]")


def _period_belongs(text: str, pos: int, end: int) -> bool:
    """Whether the period at ``end`` ends the word ``text[pos:end]`` as an abbreviation (else it is punctuation)."""
    stem = text[pos:end].lower()
    after = text[end + 1 : end + 40]
    if stem in ABBREVIATIONS:
        return True
    if "'" in stem or "’" in stem:  # "o'clock.": the period is punctuation
        return False
    if text[end + 1 : end + 2] in (",", ";", ":"):
        return True
    if stem in NUMBER_ABBREVIATIONS:
        return bool(_NUMBER_AHEAD.match(after))
    if not _INITIALISM.fullmatch(text, text.rfind("-", pos, end) + 1 or pos, end + 1):
        return False
    if end - pos == 1:  # "A." before a word that starts a sentence is a sentence end
        m = _NEXT_WORD.match(after)
        return not (m and (m.group(1) is None or m.group(1).lower() in SENTENCE_STARTERS))
    return True


def _word_tokens(word: str, after: str) -> list[str]:
    """Split a word's assimilations (``gonna`` → ``gon na``, not before a letter or a clitic); soft hyphens inside it
    are deleted."""
    word = word.replace("\u00ad", "")
    k = None if _ASCII_ALNUM.match(after) or _CLITIC_AHEAD.match(after) else _ASSIMILATIONS.get(word.lower())
    return [word[:k], word[k:]] if k else [word]


def _tokens(text: str) -> list[list[str]]:
    """Lines of raw tokens (before lower-casing and the punctuation filter)."""
    lines: list[list[str]] = [[]]
    pos, n = 0, len(text)
    while pos < n:
        if text[pos] in " \t":  # no token starts with an ASCII space or tab: skip the blank run at once
            pos = _BLANKS.match(text, pos).end()
            continue
        if text[pos] == "\n":
            lines.append([])
            pos += 1
            continue
        best, best_len = None, 0
        end = _match_word(text, pos)
        if end > pos:
            if end < n and text[end] == "." and _period_belongs(text, pos, end):
                end += 1
            best, best_len = ("word", text[pos:end]), end - pos
        for name, rx in _RULES:
            m = rx.match(text, pos)
            if m and m.end() - pos > best_len:
                best, best_len = (name, m.group()), m.end() - pos
        if best is None:  # an unpaired surrogate: deleted, as untokenizable
            pos += 1
            continue
        pos += best_len
        name, tok = best
        out = lines[-1]
        if name == "space":
            continue
        if name == "newline":
            lines.append([])
        elif name in ("sgml", "phone", "fraction"):
            out.append(tok.replace(" ", "\u00a0"))
        elif name == "entity":
            mapped = _ENTITIES.get(tok.lower(), tok)
            if mapped:
                out.append(mapped)
        elif name in ("word", "numword"):
            out.extend(_word_tokens(tok, text[pos : pos + 4]))
        elif name == "ellipsis":
            out.append("...")
        elif name == "dash":
            out.append("--")
        elif name == "quote":
            out.append("''")
        elif name == "clitic":
            out.append(tok.replace("’", "'"))
        elif name == "ampersand":
            out.append(tok.replace("&amp;", "&"))
        elif name == "unicode_quotes":
            out.append(tok.replace("‘‘", "“").replace("’’", "”").translate(_QUOTE_MAP))
        elif name == "astral":
            continue
        elif name == "soft_hyphen":
            out.append("-")
        elif name == "currency":
            out.append(_CURRENCY.get(tok, tok))
        elif name == "fraction_char":
            out.append(_FRACTIONS[tok])
        else:
            out.append(tok)
    return lines


def _lower(token: str) -> str:
    """Lower-case as the reference does: a capital sigma after the token's start and before no further letter
    (digits skipped) becomes a final sigma."""
    if "Σ" not in token:
        return token.lower()
    chars = []
    for i, ch in enumerate(token):
        if ch == "Σ":
            j = i + 1
            while j < len(token) and token[j].isdigit():
                j += 1
            final = i > 0 and not (j < len(token) and token[j].lower() != token[j].upper())  # a cased letter
            chars.append("ς" if final else "σ")
        else:
            chars.append(ch.lower())
    return "".join(chars)


def _escape(token: str) -> str:
    """Brackets as PTB names: every bracket standing alone, round brackets also inside a token."""
    if token in _BRACKETS:
        return _BRACKETS[token]
    return token.replace("(", "-LRB-").replace(")", "-RRB-")


def ptb_tokenize_lines(captions: Sequence[str]) -> list[str]:
    """Each caption's tokens, space-joined, as pycocoevalcap's ``PTBTokenizer`` returns them (one file)."""
    if not captions:
        return []
    lines = _tokens("\n".join(c.translate(_LINE_BREAKS) for c in captions))
    return [" ".join(t for t in (_lower(_escape(tok)) for tok in line) if t not in DROPPED) for line in lines]
