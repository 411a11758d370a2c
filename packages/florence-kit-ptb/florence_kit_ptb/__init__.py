"""The COCO caption tokenizer in pure Python: Stanford PTBTokenizer 3.4.1 as pycocoevalcap runs it.

pycocoevalcap (the reference every captioning paper reports BLEU / CIDEr with) writes the captions one per
line, runs ``java edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase`` (stanford-corenlp 3.4.1)
over the file, splits each output line on spaces and drops the tokens in :data:`PUNCTUATIONS`. This module
does the same without Java: :func:`ptb_tokenize_lines` scans the joined text the way the tokenizer's JFlex
scanner does (at each position the rule with the longest match wins, a trailing context counting towards
the length, the earlier rule on a tie), with each rule's pattern and action re-expressed for the ``regex``
package (POSIX leftmost-longest matching). The tests hold it to the jar's output for every caption of a
8,089-caption corpus (florence-kit's tests/fixtures/captions/; docs/metrics.md).

License: GPL-2.0-or-later (this package alone; florence-kit itself is Apache-2.0 and only imports it when
installed). Provenance: the macro and rule tables below transcribe the grammar of Stanford CoreNLP's
``PTBLexer.flex`` at tag
v3.4.1 (Copyright The Board of Trustees of The Leland Stanford Junior University, GPL-2.0-or-later) into ``regex``
syntax; the scanner loop, the actions and the Java details (UTF-16, ``toLowerCase``) are written here.

Quirks kept because pycocoevalcap has them:
- parentheses become ``-lrb-`` / ``-rrb-`` and stay (its filter lists upper-case ``-LRB-`` but the text is
  already lower-cased); ``[ ]`` and ``{ }`` likewise become ``-lsb-``, ``-rsb-``, ``-lcb-``, ``-rcb-``;
- the tokenizer reads UTF-16: a character outside the Basic Multilingual Plane (most emoji) is two
  "untokenizable" halves and is deleted, while BMP symbols (❤ ☀ ✈ ©) are tokens;
- captions are tokenised as one text, so a caption's last token can depend on the first letters of the
  next one (``... I.`` followed by a capitalised caption): :func:`ptb_tokenize_lines` therefore takes the
  captions in the order pycocoevalcap writes them (all references image by image, candidates separately).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence

import regex

PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"])  # fmt: skip  (pycocoevalcap/tokenizer/ptbtokenizer.py)

# ---------------------------------------------------------------------------------------------------------
# Macros, in the grammar's own notation (converted to `regex` syntax by _convert). The grammar is caseless:
# an ASCII letter outside a character class matches either case; classes are exact.

_MACROS: dict[str, str] = {}
_MACRO_TEXT = r"""
SGML = \<([!\?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:\.\-]*([ ]+([A-Za-z][A-Za-z0-9_:\.\-]*|[A-Za-z][A-Za-z0-9_:\.
    \-]*[ ]*=[ ]*('[^']*'|\"[^\"]*\")))*[ ]*\/?|\/[A-Za-z][A-Za-z0-9_:\.\-]*)[ ]*\>
SPMDASH = &(MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]
SPAMP = &amp;
SPPUNC = &(HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);
SPLET = &[aeiouAEIOU](acute|grave|uml);
SPACE = [ \t\u00A0\u2000-\u200A\u3000]
SPACES = {SPACE}+
NEWLINE = \r|\r?\n|\u2028|\u2029|\u000B|\u000C|\u0085
SPACENL = ({SPACE}|{NEWLINE})
SPACENLS = {SPACENL}+
SENTEND = {SPACENL}({SPACENL}|[:uppercase:]|{SGML})
DIGIT = [:digit:]|[\u07C0-\u07C9]
DATE = {DIGIT}{1,2}[\-\/]{DIGIT}{1,2}[\-\/]{DIGIT}{2,4}
NUM = {DIGIT}+|{DIGIT}*([.:,\u00AD\u066B\u066C]{DIGIT}+)+
NUMBER = [\-+]?{NUM}
SUBSUPNUM = [\u207A\u207B\u208A\u208B]?([\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)
FRAC = ({DIGIT}{1,4}[- \u00A0])?{DIGIT}{1,4}(\\?\/|\u2044){DIGIT}{1,4}
FRAC2 = [\u00BC\u00BD\u00BE\u2153-\u215E]
DOLSIGN = ([A-Z]*\$|#)
DOLSIGN2 = [\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]
LETTER = ([:letter:]|{SPLET}|[\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D\u
    0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525\u055A-\u055F\u0591-\u05BD\u05BF
    \u05C1\u05C2\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u071
    1\u0730-\u074F\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955\u0962-\
    u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81
    -\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\
    u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD])
WORD = {LETTER}({LETTER}|{DIGIT})*([.!?]{LETTER}({LETTER}|{DIGIT})*)*
FILENAME_EXT = bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|p
    pt|ps|py|sql|tar|txt|wav|x|xml|zip
FILENAME = ({LETTER}|{DIGIT})+([.]({LETTER}|{DIGIT})+)*([.]{FILENAME_EXT})
APOS = ['\u0092\u2019]|&apos;
APOSETCETERA = {APOS}|[`\u0091\u2018\u201B]
HYPHEN = [-_\u058A\u2010\u2011]
THING = ([dDoOlL]{APOSETCETERA}([:letter:]|[:digit:]))?([:letter:]|[:digit:])+({HYPHEN}([dDoOlL]{APOSETCETERA}([:let
    ter:]|[:digit:]))?([:letter:]|[:digit:])+)*
THINGA = [A-Z]+(([+&]|{SPAMP})[A-Z]+)+
THING3 = [A-Za-z0-9]+(-[A-Za-z]+){0,2}(\\?\/[A-Za-z0-9]+(-[A-Za-z]+){0,2}){1,2}
ACRO = [A-Za-z](\.[A-Za-z])*|(Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(U\.K|U\.S\.S\.R)
ACRO2 = [A-Za-z](\.[A-Za-z])+|(Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(U\.K|U\.S\.S\.R)
HTHING = [A-Za-z0-9][A-Za-z0-9.,\u00AD]*(-([A-Za-z0-9\u00AD]+|{ACRO2}\.))+
REDAUX = {APOS}([msdMSD]|re|ve|ll)
SWORD = [A-Za-z\u00AD]*[A-MO-Za-mo-z](\u00AD)*
SREDAUX = n{APOSETCETERA}t
APOWORD = {APOS}n{APOS}?|[lLdDjJ]{APOS}|Dunkin{APOS}|somethin{APOS}|ol{APOS}|{APOS}em|[A-HJ-XZn]{APOSETCETERA}[:lett
    er:]{2}[:letter:]*|{APOS}[2-9]0s|{APOS}till?|[:letter:][:letter:]*[aeiouyAEIOUY]{APOSETCETERA}[aeiouA-Z][:letter
    :]*|{APOS}cause|cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|O{APOSETCETERA}o
APOWORD2 = y{APOS}
FULLURL = https?:\/\/[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]
LIKELYURL = ((www\.([^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})|(([^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(com|net|org|e
    du)))(\/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?
EMAIL = (&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@([^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*([^ \t\n\f\r\"<>|(){}.\u0
    0A0]+)(&gt;|>)?
TWITTER_NAME = @[a-zA-Z_][a-zA-Z_0-9]*
TWITTER_CATEGORY = #{LETTER}+
TWITTER = {TWITTER_NAME}|{TWITTER_CATEGORY}
ABMONTH = Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec
ABDAYS = Mon|Tue|Tues|Wed|Thu|Thurs|Fri
ABSTATE = Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass|Md|Mich|Minn|[M]iss
    |Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo
ABCOMP = Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys
ABNUM = tel|est|ext|sq
ABPTIT = Jr|Sr|Bros|(Ed|Ph)\.D|Blvd|Rd|Esq
ABBREV1 = ({ABMONTH}|{ABDAYS}|{ABSTATE}|{ABCOMP}|{ABNUM}|{ABPTIT}|etc|al|seq|Bldg)\.
ABTITLE = Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Capt|Ste?|
    Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc
ABCOMP2 = Invt|Elec|Natl|M[ft]g|Dept
ABBREV4 = {ABTITLE}|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|{ACRO}|{ABCOMP2}
ABBREV2 = {ABBREV4}\.
ACRONYM = ({ACRO})\.
ABBREV3 = (ca|figs?|prop|nos?|art|bldg|prop|pp|op)\.
PHONE = (\([0-9]{2,3}\)[ \u00A0]?|(\+\+?)?([0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])[0-9]{3,4}[\- \u00A0]?[0-9]{
    3,5}|((\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}
FAKEDUCKFEET = <<|>>
LESSTHAN = <|&lt;
GREATERTHAN = >|&gt;
HYPHENS = \-+
LDOTS = \.{3,5}|(\.[ \u00A0]){2,4}\.|[\u0085\u2026]
ATS = @+
UNDS = _+
ASTS = \*+|(\\\*){1,3}
HASHES = #+
FNMARKS = {ATS}|{HASHES}|{UNDS}
INSENTP = [,;:\u3001]
QUOTES = {APOS}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00B
    B]{1,2}
DBLQUOT = \"|&quot;
TBSPEC = -(RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(&|&amp;)P-500|S(&|&amp;)Ls|Cap{APOS}n|c{APOS}est
TBSPEC2 = {APOS}[0-9][0-9]
SMILEY = [<>]?[:;=][\-o\*']?[\(\)DPdpO\\{@\|\[\]]
ASIANSMILEY = [\^x=~<>]\.\[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)|\([\^x=~<>']-[\^x=~<
    >'`]\)
MISCSYMBOL = [+%&~\^|\\¦\u00A7¨\u00A9\u00AC\u00AE¯\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u0387\u05BE\u05C0\u05C3\u05
    C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E\u066A\u066D\u0703-\u070D\u07F6\u07F7\u07F8\u096
    4\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u21
    00-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65\uFF65]
"""

_CLASSES = {"[:letter:]": r"\p{L}", "[:digit:]": r"\p{Nd}", "[:uppercase:]": r"\p{Lu}"}
_ESCAPE_KEEP = set("uxrntf.-()[]{}\\*+?|$^/")


def _convert(jflex: str) -> str:
    """Rewrite one grammar expression as a `regex` pattern (macros expanded, caseless letters spelled out)."""
    out: list[str] = []
    i, n = 0, len(jflex)
    while i < n:
        c = jflex[i]
        if jflex.startswith("[^]", i):
            out.append(r"[\s\S]")
            i += 3
        elif c == "[" and jflex.startswith(tuple(_CLASSES), i):
            name = jflex[i : jflex.index(":]", i) + 2]
            out.append(_CLASSES[name])
            i += len(name)
        elif c == "[":  # a character class: copied as is (exact case), [:letter:] inside expanded
            j = i + 1
            if j < n and jflex[j] == "^":
                j += 1
            if j < n and jflex[j] == "]":
                j += 1
            while jflex[j] != "]":
                j += 2 if jflex[j] == "\\" else 1
            body = jflex[i : j + 1]
            for name, repl in _CLASSES.items():
                body = body.replace(name, repl)
            out.append(body.replace('\\"', '"'))
            i = j + 1
        elif c == "{" and jflex[i + 1].isalpha():
            j = jflex.index("}", i)
            out.append("(?:" + _MACROS[jflex[i + 1 : j]] + ")")
            i = j + 1
        elif c == "\\":
            e = jflex[i + 1]
            if e == "u":
                out.append(jflex[i : i + 6])
                i += 6
            elif e == "x":
                out.append(jflex[i : i + 4])
                i += 4
            elif e == "0":
                out.append(r"\x00")
                i += 2
            elif e in _ESCAPE_KEEP:
                out.append(jflex[i : i + 2])
                i += 2
            else:  # \" \< \> \! ...: the character itself
                out.append(re.escape(e))
                i += 2
        elif c == ".":
            out.append(r"[^\n]")
            i += 1
        elif c.isascii() and c.isalpha():
            out.append(f"[{c.lower()}{c.upper()}]")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _entries(text: str) -> list[str]:
    """The lines of a block, a line indented by four spaces continuing the one before it (exactly, no space)."""
    entries: list[str] = []
    for line in text.strip("\n").split("\n"):
        if line.startswith("    "):
            entries[-1] += line[4:]
        else:
            entries.append(line)
    return entries


for _entry in _entries(_MACRO_TEXT):
    _name, _, _body = _entry.partition(" = ")
    _MACROS[_name] = _convert(_body)


# ---------------------------------------------------------------------------------------------------------
# Rules, in the grammar's order (the earlier one wins a tie). Each: expression (a top-level "/" starts the
# trailing context) and the action's name.

_RULE_TEXT = r"""
c[+][+]	keep
(c|f)#	keep
cannot	back3
'twas	back3
'tis	back2
gonna|gotta|lemme|gimme|wanna	back2
{SGML}	space
{SPMDASH}	mdash
{SPAMP}	amp
{SPPUNC}	keep
{WORD}/{REDAUX}	soft
{SWORD}/{SREDAUX}	soft
{WORD}	soft
{APOWORD}	keep
{APOWORD2}/[:letter:]	keep
{FULLURL}	keep
{LIKELYURL}	keep
{EMAIL}	keep
{TWITTER}	keep
{REDAUX}/[^A-Za-z]	right
{SREDAUX}/[^A-Za-z]	right
{DATE}	keep
{NUMBER}	soft
{SUBSUPNUM}	keep
{FRAC}	space
{FRAC2}	frac
{TBSPEC}	amp
{THING3}	keep
{DOLSIGN}	keep
{DOLSIGN2}	currency
{ACRONYM}/({SPACENLS})([A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[E]arlier|[H]e|[H]er|[H]e
    re|[H]owever|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\.|[M]s\.|[N]ow|[O]nce|[O]ne|[O]ther|[O]ur|[S]he|[S]ince|[S
    ]o|[S]ome|[S]uch|[T]hat|[T]he|[T]heir|[T]hen|[T]here|[T]hese|[T]hey|[T]his|[W]e|[W]hen|[W]hile|[W]hat|[Y]et|[Y]o
    u|{SGML}){SPACENL}	acronym
{ABBREV3}/{SPACENL}?[:digit:]	keep
(pt[eyEY]|co)\./{SPACE}(ltd|lim)	keep
{ABBREV1}/{SENTEND}	dot_again
{ABBREV1}/[^][^]	keep
{ABBREV1}	dot_again
{ABBREV2}	keep
{ABBREV4}/{SPACE}	keep
{ACRO}/{SPACENL}	keep
{TBSPEC2}/{SPACENL}	keep
{FILENAME}/({SPACENL}|[.?!,])	keep
{WORD}\./{INSENTP}	soft
{PHONE}	phone
{DBLQUOT}/[A-Za-z0-9$]	left
{DBLQUOT}	right
\x7f	skip
{LESSTHAN}	lt
{GREATERTHAN}	gt
{SMILEY}/[^A-Za-z0-9]	parens
{ASIANSMILEY}	parens
\{	-LCB-
\}	-RCB-
\[	-LSB-
\]	-RSB-
\(	-LRB-
\)	-RRB-
{HYPHENS}	hyphens
{LDOTS}	...
{FNMARKS}	keep
{ASTS}	keep
{INSENTP}	keep
[?!]+	keep
[.¡¿\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]	keep
=	keep
\/	keep
{HTHING}\./{INSENTP}	soft
{HTHING}	soft
{THING}\./{INSENTP}	keep
{THING}	keep
{THINGA}\./{INSENTP}	amp
{THINGA}	amp
'/[A-Za-z][^ \t\n\r\u00A0]	left
{REDAUX}	right
{SREDAUX}	right
{QUOTES}	right
{FAKEDUCKFEET}	keep
{MISCSYMBOL}	keep
\0|{SPACES}|[\u200B\u200E-\u200F\uFEFF]	skip
{NEWLINE}	newline
&nbsp;	skip
.	skip
"""


def _split_context(expr: str) -> tuple[str, str | None]:
    """Split 'r1/r2' at the top-level slash (not escaped, not in a class or group)."""
    depth, i = 0, 0
    while i < len(expr):
        c = expr[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            j = i + 1 + (expr[i + 1] == "^")
            j += expr[j] == "]"
            while expr[j] != "]":
                j += 2 if expr[j] == "\\" else 1
            i = j + 1
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "/" and depth == 0:
            return expr[:i], expr[i + 1 :]
        i += 1
    return expr, None


_EMAIL_RUN = re.compile('[^ \t\n\f\r"<>|()\u00a0{}]*')


def _may_be_email(text: str, pos: int) -> bool:
    """EMAIL needs an @ before the first character its local part excludes. Checked here because the regex engine
    looks for the @ through the whole rest of the text first, which made long inputs quadratic."""
    run = _EMAIL_RUN.match(text, pos + (text[pos] == "<"))
    return "@" in text[pos : run.end()]


class _Rule:
    __slots__ = ("action", "context", "guard", "head", "whole")

    def __init__(self, expr: str, action: str) -> None:
        head, context = _split_context(expr)
        self.guard = _may_be_email if expr == "{EMAIL}" else None
        self.action = action
        self.head = regex.compile(_convert(head), regex.POSIX)
        self.context = regex.compile(_convert(context), regex.POSIX) if context is not None else None
        self.whole = regex.compile(_convert(head) + (f"(?:{_convert(context)})" if context else ""), regex.POSIX)

    def head_length(self, text: str, pos: int, end: int) -> int:
        """Where the token ends inside a match of head+context that ends at ``end``: the longest head."""
        if self.context is None:
            return end - pos
        for k in range(end, pos, -1):
            if self.head.fullmatch(text, pos, k) and self.context.fullmatch(text, k, end):
                return k - pos
        raise AssertionError("trailing context without a head")  # pragma: no cover


@functools.cache
def _rules() -> tuple[_Rule, ...]:
    """The compiled rules, on first use (compiling them takes about half a second; importing the metrics should not)."""
    return tuple(_Rule(*entry.split("\t")) for entry in _entries(_RULE_TEXT))


@functools.lru_cache(maxsize=4096)
def _candidates(first: str) -> tuple[_Rule, ...]:
    """The rules whose match can start with this character (a partial match of it alone)."""
    return tuple(rule for rule in _rules() if rule.whole.match(first, partial=True))


# ---------------------------------------------------------------------------------------------------------
# Actions (the tokenizer's defaults: ptb3Escaping on, americanize off, untokenizable characters deleted)

_LATEX_LEFT = [(re.compile(r"&apos;|'"), "`"), (re.compile(r'"|&quot;'), "``")]
_LATEX_RIGHT = [(re.compile(r"&apos;|'"), "'"), (re.compile(r'"|&quot;'), "''")]
_LATEX_BOTH = [(re.compile("[\u0091\u2018\u201b\u2039]"), "`"), (re.compile("[\u0092\u2019\u203a]"), "'"),
               (re.compile("[\u0093\u201c\u00ab]"), "``"), (re.compile("[\u0094\u201d\u00bb]"), "''")]  # fmt: skip
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_AMP = re.compile("&amp;", re.IGNORECASE)
_CURRENCY = re.compile("[\u0080\u00a4\u20a0\u20ac]")


def _quotes(text: str, left: bool) -> str:
    for pattern, repl in (_LATEX_LEFT if left else _LATEX_RIGHT) + _LATEX_BOTH:
        text = pattern.sub(repl, text)
    return text


def _soft(text: str) -> str:
    return (text.replace("\u00ad", "") or "-") if "\u00ad" in text else text


def _parens(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


_FIXED = {
    "keep": lambda t: t, "soft": _soft, "space": lambda t: t.replace(" ", "\u00a0"), "mdash": lambda t: "--",
    "amp": lambda t: _AMP.sub("&", t), "right": lambda t: _quotes(t, False), "left": lambda t: _quotes(t, True),
    "frac": lambda t: "".join(_FRACTIONS.get(c, c) for c in t), "lt": lambda t: "<", "gt": lambda t: ">",
    "currency": lambda t: _CURRENCY.sub("$", t.replace("\u00a2", "cents").replace("\u00a3", "#")),
    "phone": lambda t: _parens(t.replace(" ", "\u00a0")), "parens": _parens,
    "hyphens": lambda t: "--" if 3 <= len(t) <= 4 else t, "...": lambda t: "...",
}  # fmt: skip
_WHITESPACE_END = " \t\n\u000b\u000c\r\u0085"

NEWLINE = object()


# Fast paths that give what the rules give, three times faster: a run of SPACE characters that starts with a space or
# tab (no other rule starts so; an NBSP can start a URL), and a run of ASCII letters followed by a space, a line end
# or the end (WORD wins: every longer rule needs a character such a run lacks), bar the words split by assimilation.
_FAST_SPACES = re.compile("[ \t][ \t\u00a0\u2000-\u200a\u3000]*")
_FAST_WORD = re.compile(r"[A-Za-z]+(?=[ \n]|\Z)")
_ASSIMILATIONS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _lex(text: str) -> list[object]:
    """Tokens of ``text`` (UTF-16 code units, as the Java scanner sees them), NEWLINE for each line end."""
    tokens: list[object] = []
    pos, n = 0, len(text)
    while pos < n:
        fast = _FAST_SPACES.match(text, pos)
        if fast is not None:
            pos = fast.end()
            continue
        fast = _FAST_WORD.match(text, pos)
        if fast is not None and fast.group().lower() not in _ASSIMILATIONS:
            tokens.append(fast.group())
            pos = fast.end()
            continue
        best, best_end = None, -1
        for rule in _candidates(text[pos]):
            if rule.guard is not None and not rule.guard(text, pos):
                continue
            m = rule.whole.match(text, pos)
            if m is not None and m.end() > best_end:
                best, best_end = rule, m.end()
        assert best is not None  # the last rule matches any character but "\n", which NEWLINE takes
        length = best.head_length(text, pos, best_end)
        token = text[pos : pos + length]
        action = best.action
        if action in ("back2", "back3"):
            length -= int(action[-1])
            tokens.append(token[:length])
        elif action == "acronym":
            while token and token[-1] in _WHITESPACE_END:
                token, length = token[:-1], length - 1
            if length == 2:  # "I." before "The": the letter now, the period next time
                length = 1
                tokens.append(token[:1])
            else:  # the acronym with its period, and the period again as the next token
                tokens.append(token)
                length -= 1
        elif action == "dot_again":
            tokens.append(token)
            length -= 1
        elif action == "newline":
            tokens.append(NEWLINE)
        elif action != "skip":
            tokens.append(_FIXED[action](token) if action in _FIXED else action)
        pos += length
    return tokens


def _to_utf16_units(text: str) -> str:
    """Characters beyond U+FFFF as their two surrogates: the Java scanner reads UTF-16 code units."""
    if all(ord(c) < 0x10000 for c in text):
        return text
    return "".join(c if ord(c) < 0x10000 else chr(0xD800 + ((ord(c) - 0x10000) >> 10)) + chr(0xDC00 + (ord(c) & 0x3FF))
                   for c in text)  # fmt: skip


def _from_utf16_units(token: str) -> str:
    return token.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _cased(c: str) -> bool:
    return unicodedata.category(c) in ("Lu", "Ll", "Lt") or c.lower() != c or c.upper() != c


def _in_word(token: str, j: int) -> bool:
    """Whether token[j] is inside a word for Java's word BreakIterator: letters, digits, marks, _, and - . ' " between
    two letters (measured on Java 17: a-Σ and a.Σ are one word, a:Σ and x-4Σ are not)."""
    c = token[j]
    if c.isalnum() or c == "_" or unicodedata.category(c).startswith("M"):
        return True
    return c in "-.'\"\u2019\u00ad" and 0 < j < len(token) - 1 and token[j - 1].isalpha() and token[j + 1].isalpha()


def _java_lower(token: str) -> str:
    """Java's ``toLowerCase(Locale.ENGLISH)``: as str.lower(), but a capital sigma is final (ς) when a cased
    letter comes before it in the same word and none after, digits and marks in between allowed."""
    if "Σ" not in token:
        return token.lower()
    out = []
    for i, c in enumerate(token):
        if c != "Σ":
            out.append(c.lower())
            continue
        before = after = False
        j = i - 1
        while j >= 0 and _in_word(token, j):
            if _cased(token[j]):
                before = True
                break
            j -= 1
        j = i + 1
        while j < len(token) and _in_word(token, j):
            if _cased(token[j]):
                after = True
                break
            j += 1
        out.append("ς" if before and not after else "σ")
    return "".join(out)


# Characters the Java tokenizer takes for line ends. pycocoevalcap replaces only "\n" before writing one caption per
# line, so a caption holding one of these would shift every later caption's tokens by a line; here they are spaces.
LINE_BREAKS = str.maketrans(dict.fromkeys("\n\r\u000b\u000c\u2028\u2029", " "))


def ptb_tokenize_lines(captions: Sequence[str]) -> list[str]:
    """pycocoevalcap's ``PTBTokenizer().tokenize`` for captions in the order it writes them, without Java: per caption
    its tokens lower-cased and joined by spaces, :data:`PUNCTUATIONS` dropped.

    The captions are tokenised as one text, one per line, as pycocoevalcap does (the last token of a caption may
    depend on the next line: ``... I.`` before a capitalised caption): give references and candidates separately.
    """
    if not captions:
        return []
    text = _to_utf16_units("\n".join(c.translate(LINE_BREAKS) for c in captions))
    lines: list[list[str]] = [[]]
    for token in _lex(text):
        if token is NEWLINE:
            lines.append([])
        else:
            lines[-1].append(_java_lower(_from_utf16_units(token)))  # type: ignore[arg-type]
    # pycocoevalcap: line.rstrip().split(" "), tokens in PUNCTUATIONS dropped
    return [" ".join(w for w in " ".join(words).rstrip().split(" ") if w not in PUNCTUATIONS) for words in lines]


def ptb_tokenize(caption: str) -> str:
    """One caption alone (a file of one line)."""
    return ptb_tokenize_lines([caption])[0]
