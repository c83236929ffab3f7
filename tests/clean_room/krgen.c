/*
 * krgen: a clean-room `generate` command of a knockd-rotator client, written
 * from docs/SPEC.md alone (the reference scripts were not read; where the
 * SPEC was later made precise, the reference was read only to make the
 * SPEC's text say what it does, and krgen follows that text).
 *
 *   krgen generate [--offset N] [--pin] [--code CODE] [--use N]
 *                  [--format knockd|knock|json] SERVICE
 *
 * The command word may be a prefix of `generate`; options are `--name value`
 * or `--name=value` (SPEC "Command line").  Outside the SPEC's contract
 * krgen has its own reading: the word after a valued option is its value
 * whatever it is, `--` ends the options, and any other word that begins with
 * `-` (but `-` itself) is an option.
 *
 * Settings come from the KNOCKD_ROTATOR_* environment; the clock is
 * time(NULL), or KRGEN_NOW (a whole number of seconds) for tests.  A client
 * that remembers no use counter: a single-use door knocks with use 0 unless
 * --use says otherwise.  Output: the sequence on stdout, or one line
 * `error: ...` on stderr and the exit code of SPEC "Errors and exit codes".
 *
 * Build: gcc -O2 -o krgen krgen.c -lcrypto
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

typedef __int128 i128;

#define EXIT_USAGE 2
#define EXIT_SETTING 3

static void fail(int code, const char *fmt, ...)
{
    va_list ap;
    fputs("error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stdout);
    exit(code);
}

/* TEXT for a message: printable ASCII as it is, any other byte as \xNN, so
 * that the error stays one line. */
static const char *shown(const char *text)
{
    static char out[4][1024];
    static int slot;
    char *o = out[slot++ % 4];
    size_t j = 0;
    for (const unsigned char *s = (const unsigned char *)text; *s && j < sizeof out[0] - 8; s++) {
        if (*s >= 0x20 && *s < 0x7f)
            o[j++] = (char)*s;
        else
            j += (size_t)sprintf(o + j, "\\x%02x", *s);
    }
    o[j] = 0;
    return o;
}

/* ---- byte strings ---------------------------------------------------- */

typedef struct {
    unsigned char *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *data, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->p = realloc(b->p, b->cap);
        if (!b->p)
            abort();
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void put_u32(buf *b, uint32_t v)
{
    unsigned char x[4] = {v >> 24, v >> 16, v >> 8, v};
    put(b, x, 4);
}

static void put_i64(buf *b, int64_t s)
{
    uint64_t v = (uint64_t)s;
    unsigned char x[8];
    for (int i = 0; i < 8; i++)
        x[i] = (unsigned char)(v >> (56 - 8 * i));
    put(b, x, 8);
}

static void put_str(buf *b, const char *s) { put(b, s, strlen(s)); }

/* ---- UTF-8 (SPEC "Text") --------------------------------------------- */

/* Length of the valid UTF-8 sequence at s (n bytes left), 0 if invalid;
 * *cp gets the code point. */
static int utf8_seq(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned char c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    int len;
    uint32_t v, min;
    if (c >= 0xC2 && c <= 0xDF) { len = 2; v = c & 0x1F; min = 0x80; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; v = c & 0x0F; min = 0x800; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; v = c & 0x07; min = 0x10000; }
    else return 0;
    if ((size_t)len > n)
        return 0;
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        v = (v << 6) | (s[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        return 0;
    *cp = v;
    return len;
}

/* The characters of a secret (SPEC "Text"), read from the first byte on: a
 * well-formed sequence is its code point; a byte where none starts is a
 * character of its own, 0x110000 + the byte: unlike every code point, and
 * like only the same byte.  *count gets their number. */
static uint32_t *characters(const unsigned char *s, size_t n, size_t *count)
{
    uint32_t *chars = malloc((n + 1) * sizeof *chars);
    if (!chars)
        abort();
    size_t i = 0, k = 0;
    while (i < n) {
        uint32_t cp;
        int len = utf8_seq(s + i, n - i, &cp);
        if (len == 0) {
            len = 1;
            cp = 0x110000u + s[i];
        }
        chars[k++] = cp;
        i += (size_t)len;
    }
    *count = k;
    return chars;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* Every character of C (N of them) in the ASCII set SET? */
static int all_in(const uint32_t *c, size_t n, const char *set)
{
    for (size_t i = 0; i < n; i++)
        if (c[i] > 0x7F || !c[i] || !strchr(set, (int)c[i]))
            return 0;
    return 1;
}

/* SPEC "Secret strength": bits(secret), counted on its characters. */
static unsigned long long secret_bits(const unsigned char *s, size_t n)
{
    size_t count;
    uint32_t *c = characters(s, n, &count);
    /* 1. fewer than 6 different characters: 0 */
    uint32_t *sorted = malloc((count + 1) * sizeof *sorted);
    if (!sorted)
        abort();
    memcpy(sorted, c, count * sizeof *c);
    qsort(sorted, count, sizeof *sorted, cmp_u32);
    size_t different = 0;
    for (size_t i = 0; i < count; i++)
        different += i == 0 || sorted[i] != sorted[i - 1];
    free(sorted);
    if (different < 6) {
        free(c);
        return 0;
    }
    /* 2. the shortest prefix of which the secret is a whole number of copies */
    size_t unit = count;
    for (size_t d = 1; d < count; d++) {
        if (count % d)
            continue;
        size_t i = d;
        while (i < count && c[i] == c[i - d])
            i++;
        if (i == count) {
            unit = d;
            break;
        }
    }
    /* 3. times the bits of the first alphabet that holds every character,
     * exact decimals rounded down */
    static const char DECIMAL[] = "0123456789";
    static const char HEX[] = "0123456789abcdefABCDEF";
    static const char LOWER[] = "abcdefghijklmnopqrstuvwxyz";
    static const char BASE32[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567=";
    unsigned long long u = unit, bits;
    if (all_in(c, count, DECIMAL))
        bits = u * 332 / 100;
    else if (all_in(c, count, HEX))
        bits = u * 4;
    else if (all_in(c, count, LOWER))
        bits = u * 47 / 10;
    else if (all_in(c, count, BASE32))
        bits = u * 5;
    else
        bits = u * 6;
    free(c);
    return bits;
}

/* ---- whole numbers (SPEC "Whole numbers") ------------------------------ */

/* [0-9]{1,20} in the N bytes at S, ASCII only: 1 and *out on success, else 0. */
static int digits(const char *s, size_t n, i128 *out)
{
    if (n < 1 || n > 20)
        return 0;
    i128 v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 1;
}

/* -?[0-9]{1,20}, ASCII only: 1 and *out on success, else 0. */
static int whole_number(const char *s, i128 *out)
{
    int neg = *s == '-';
    i128 v;
    if (!digits(s + neg, strlen(s + neg), &v))
        return 0;
    *out = neg ? -v : v;
    return 1;
}

static char *i128_text(i128 v, char *out)
{
    char tmp[64];
    int i = 0, neg = v < 0;
    unsigned __int128 u = neg ? -(unsigned __int128)v : (unsigned __int128)v;
    do {
        tmp[i++] = '0' + (int)(u % 10);
        u /= 10;
    } while (u);
    int j = 0;
    if (neg)
        out[j++] = '-';
    while (i)
        out[j++] = tmp[--i];
    out[j] = 0;
    return out;
}

/* ---- settings of a door (SPEC "Settings of a door") ------------------- */

static char door_key[256]; /* <NAME> */

/* KNOCKD_ROTATOR_<SETTING>_<NAME> if set (even empty), else the general
 * one, else NULL. */
static const char *setting(const char *name)
{
    char var[512];
    snprintf(var, sizeof var, "KNOCKD_ROTATOR_%s_%s", name, door_key);
    const char *v = getenv(var);
    if (v)
        return v;
    snprintf(var, sizeof var, "KNOCKD_ROTATOR_%s", name);
    return getenv(var);
}

/* A whole-number setting in [lo, hi]; DEF when unset. */
static i128 number_setting(const char *name, const char *value, i128 lo, i128 hi, i128 def)
{
    if (!value)
        return def;
    i128 v;
    if (!*value)
        fail(EXIT_SETTING, "KNOCKD_ROTATOR_%s is empty (give a whole number)", name);
    if (!whole_number(value, &v))
        fail(EXIT_SETTING, "KNOCKD_ROTATOR_%s is not a whole number (use -?[0-9]{1,20})", name);
    if (v < lo || v > hi) {
        char a[64], b[64];
        fail(EXIT_SETTING, "KNOCKD_ROTATOR_%s is out of range (use %s to %s)", name,
             i128_text(lo, a), i128_text(hi, b));
    }
    return v;
}

/* ---- typed lines (SPEC "Codes and PINs typed") ------------------------ */

static buf typed_line(void)
{
    buf b = {0};
    put(&b, "", 0);
    unsigned char c;
    for (;;) {
        ssize_t r = read(0, &c, 1);
        if (r <= 0)
            break;
        put(&b, &c, 1);
        if (c == '\n')
            break;
    }
    if (b.n && b.p[b.n - 1] == '\n')
        b.p[--b.n] = 0;
    if (b.n && b.p[b.n - 1] == '\r')
        b.p[--b.n] = 0;
    return b;
}

/* ---- the algorithm ----------------------------------------------------- */

static void hmac256(const unsigned char *key, size_t keylen, const unsigned char *msg,
                    size_t msglen, unsigned char out[32])
{
    unsigned int len = 32;
    if (!HMAC(EVP_sha256(), key, (int)keylen, msg, msglen, out, &len))
        abort();
}

static void pbkdf2(const unsigned char *pw, size_t pwlen, const buf *salt, unsigned char out[32])
{
    if (!PKCS5_PBKDF2_HMAC((const char *)pw, (int)pwlen, salt->p, (int)salt->n, 20000,
                           EVP_sha256(), 32, out))
        abort();
}

/* Steps 2 and 3: LENGTH distinct ports, not in scan order. */
static void draw_ports(const unsigned char *key, size_t keylen, const char *door,
                       int64_t period_start, int length, int ports[32])
{
    buf prefix = {0};
    put_u32(&prefix, 16);
    put_str(&prefix, "knockd-rotator/1");
    put_u32(&prefix, (uint32_t)strlen(door));
    put_str(&prefix, door);
    put_i64(&prefix, period_start);
    size_t base = prefix.n;
    int n = 0;
    for (uint32_t k = 0;; k++) {
        unsigned char block[32];
        prefix.n = base;
        put_u32(&prefix, k);
        hmac256(key, keylen, prefix.p, prefix.n, block);
        for (int j = 0; j < 32; j += 2) {
            unsigned v = (block[j] << 8) | block[j + 1];
            if (v >= 63536)
                continue;
            int port = 2000 + (int)v, dup = 0;
            for (int i = 0; i < n; i++)
                dup |= ports[i] == port;
            if (dup)
                continue;
            ports[n++] = port;
            if (n == length) {
                int up = 1, down = 1;
                for (int i = 1; i < n; i++) {
                    up &= ports[i] > ports[i - 1];
                    down &= ports[i] < ports[i - 1];
                }
                if (length >= 3 && (up || down)) {
                    n = 0;
                    continue;
                }
                free(prefix.p);
                return;
            }
        }
    }
}

/* The appendix's int(first 8 hex digits of hex(SHA-256(text)), 16). */
static uint32_t legacy_value(int64_t period_start, const char *door, const unsigned char *secret,
                             size_t secretlen, int i)
{
    char num[64];
    buf text = {0};
    put_str(&text, i128_text(period_start, num));
    put_str(&text, door);
    put(&text, secret, secretlen);
    snprintf(num, sizeof num, "%d", i);
    put_str(&text, num);
    unsigned char h[32];
    SHA256(text.p, text.n, h);
    free(text.p);
    return ((uint32_t)h[0] << 24) | ((uint32_t)h[1] << 16) | ((uint32_t)h[2] << 8) | h[3];
}

/* legacy-v3's KNOCKD_ROTATOR_PORTS: 1 and the sorted ranges, or 0. */
typedef struct {
    long lo, hi;
} range;

static int cmp_range(const void *a, const void *b)
{
    long x = ((const range *)a)->lo, y = ((const range *)b)->lo;
    return (x > y) - (x < y);
}

static int parse_digits(const char *s, size_t n, long *out)
{
    i128 v;
    if (!digits(s, n, &v))
        return 0;
    *out = v > 1000000 ? 1000000 : (long)v;
    return 1;
}

static int parse_ports(const char *text, range **out, size_t *count)
{
    size_t cap = 8, n = 0;
    range *r = malloc(cap * sizeof *r);
    const char *p = text;
    for (;;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        const char *a = p, *z = p + len;
        while (a < z && (*a == ' ' || *a == '\t'))
            a++;
        while (z > a && (z[-1] == ' ' || z[-1] == '\t'))
            z--;
        const char *dash = memchr(a, '-', (size_t)(z - a));
        long lo, hi;
        if (dash) {
            if (!parse_digits(a, (size_t)(dash - a), &lo) ||
                !parse_digits(dash + 1, (size_t)(z - dash - 1), &hi))
                return 0;
        } else {
            if (!parse_digits(a, (size_t)(z - a), &lo))
                return 0;
            hi = lo;
        }
        if (!(1 <= lo && lo <= hi && hi <= 65536))
            return 0;
        if (n == cap)
            r = realloc(r, (cap *= 2) * sizeof *r);
        r[n].lo = lo;
        r[n].hi = hi;
        n++;
        if (!end)
            break;
        p = end + 1;
    }
    qsort(r, n, sizeof *r, cmp_range);
    long total = 0;
    for (size_t i = 0; i < n; i++) {
        if (i && r[i].lo <= r[i - 1].hi)
            return 0;
        total += r[i].hi - r[i].lo + 1;
    }
    if (total < 2)
        return 0;
    *out = r;
    *count = n;
    return 1;
}

static long port_at(const range *r, size_t n, long index)
{
    for (size_t i = 0; i < n; i++) {
        long size = r[i].hi - r[i].lo + 1;
        if (index < size)
            return r[i].lo + index;
        index -= size;
    }
    abort();
}

/* ---- the command ------------------------------------------------------- */

static const char *USAGE =
    "usage: krgen generate [--offset N] [--pin] [--code CODE] [--use N]\n"
    "                      [--format {knockd,knock,json}] SERVICE\n";

static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

int main(int argc, char **argv)
{
    /* 1. the command line (exit 2) */
    const char *offset_text = NULL, *code = NULL, *use_text = NULL, *format = "knockd";
    const char *service = NULL;
    int want_pin = 0, positional_only = 0;
    if (argc < 2)
        fail(EXIT_USAGE, "no command (use: krgen generate SERVICE)");
    const char *word = argv[1];
    if (!*word || strncmp(word, "generate", strlen(word)) != 0 || strlen(word) > 8) {
        if (!strcmp(word, "-h") || !strcmp(word, "--help")) {
            fputs(USAGE, stdout);
            return 0;
        }
        fail(EXIT_USAGE, "unknown command '%s' (only generate is implemented)", shown(word));
    }
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (positional_only || a[0] != '-' || !a[1]) {
            if (service)
                fail(EXIT_USAGE, "one SERVICE only (got '%s' too)", shown(a));
            service = a;
            continue;
        }
        if (!strcmp(a, "--")) {
            positional_only = 1;
            continue;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(USAGE, stdout);
            return 0;
        }
        if (!strcmp(a, "--pin")) {
            want_pin = 1;
            continue;
        }
        static const char *valued[] = {"--offset", "--code", "--use", "--format"};
        const char **slot[] = {&offset_text, &code, &use_text, &format};
        int found = 0;
        for (int k = 0; k < 4; k++) {
            size_t len = strlen(valued[k]);
            if (strncmp(a, valued[k], len) != 0)
                continue;
            if (a[len] == '=') {
                *slot[k] = a + len + 1;
            } else if (!a[len]) {
                if (i + 1 >= argc)
                    fail(EXIT_USAGE, "%s needs a value (see --help)", valued[k]);
                *slot[k] = argv[++i];
            } else {
                continue;
            }
            found = 1;
            /* Every value given is checked, not only the last one (an option
             * given twice: the last one counts). */
            i128 v;
            if (k == 0 && !whole_number(offset_text, &v))
                fail(EXIT_USAGE, "--offset is not a whole number (use -?[0-9]{1,20})");
            if (k == 2 && (!whole_number(use_text, &v) || v < 0 || v > 4294967295LL))
                fail(EXIT_USAGE, "--use must be a whole number from 0 to 4294967295");
            if (k == 3 && strcmp(format, "knockd") && strcmp(format, "knock") &&
                strcmp(format, "json"))
                fail(EXIT_USAGE, "--format must be knockd, knock or json");
            break;
        }
        if (!found)
            fail(EXIT_USAGE, "unknown option '%s' (see --help)", shown(a));
    }
    if (!service)
        fail(EXIT_USAGE, "no SERVICE given (e.g. krgen generate ssh)");
    i128 offset = 0, use = 0;
    if (offset_text)
        whole_number(offset_text, &offset); /* checked as it was read */
    if (use_text)
        whole_number(use_text, &use);

    /* 2. the door name (exit 2) */
    if (!*service)
        fail(EXIT_USAGE, "empty service name (e.g. ssh)");
    static const char SUFFIX[] = "_ROTATOR";
    size_t slen = strlen(service), suf = sizeof SUFFIX - 1;
    buf door = {0};
    put_str(&door, service);
    if (!(slen >= suf && !memcmp(service + slen - suf, SUFFIX, suf)))
        put_str(&door, SUFFIX);
    if (door.n > 127)
        fail(EXIT_USAGE, "door name longer than 127 bytes (knockd cuts it; use a shorter one)");
    {
        size_t i = 0, k = 0;
        size_t namebytes = door.n - suf;
        while (i < door.n) {
            uint32_t cp;
            int len = utf8_seq(door.p + i, door.n - i, &cp);
            if (!len)
                fail(EXIT_USAGE, "door name is not valid UTF-8 (rename it)");
            if (cp <= 0x1F || (cp >= 0x7F && cp <= 0x9F) || cp == '[' || cp == ']' ||
                cp == 0x2028 || cp == 0x2029)
                fail(EXIT_USAGE, "door name holds U+%04X (rename it)", (unsigned)cp);
            if (i < namebytes) {
                if ((cp >= 'a' && cp <= 'z'))
                    door_key[k++] = (char)(cp - 32);
                else if ((cp >= 'A' && cp <= 'Z') || (cp >= '0' && cp <= '9'))
                    door_key[k++] = (char)cp;
                else
                    door_key[k++] = '_';
            }
            i += len;
        }
        door_key[k] = 0;
    }
    const char *door_name = (const char *)door.p;

    /* 3. the settings (exit 3) */
    const char *mode_text = setting("MODE");
    const char *alg_text = setting("ALGORITHM");
    int alg; /* 0 knockd-rotator/1, 1 legacy-v1, 3 legacy-v3 */
    if (!alg_text || !*alg_text || !strcmp(alg_text, "knockd-rotator/1"))
        alg = 0;
    else if (!strcmp(alg_text, "legacy-v1"))
        alg = 1;
    else if (!strcmp(alg_text, "legacy-v3"))
        alg = 3;
    else
        alg = -1;
    int totp;
    /* A code given at all makes the mode of a door whose MODE is unset or
     * empty totp, legacy doors too (which then refuse it below, exit 3). */
    if (!mode_text || !*mode_text)
        totp = code != NULL;
    else if (!strcmp(mode_text, "secret"))
        totp = 0;
    else if (!strcmp(mode_text, "totp"))
        totp = 1;
    else
        fail(EXIT_SETTING, "KNOCKD_ROTATOR_MODE must be secret or totp");
    if (alg < 0)
        fail(EXIT_SETTING,
             "KNOCKD_ROTATOR_ALGORITHM must be knockd-rotator/1, legacy-v1 or legacy-v3");
    int single_use = (int)number_setting("SINGLE_USE", setting("SINGLE_USE"), 0, 1, 0);
    const char *pin_env = setting("PIN");
    int env_pin = pin_env && *pin_env;
    if (alg) {
        if (env_pin)
            fail(EXIT_SETTING, "legacy doors have no PIN (unset KNOCKD_ROTATOR_PIN)");
        if (totp)
            fail(EXIT_SETTING, "legacy doors have no totp mode (unset KNOCKD_ROTATOR_MODE, "
                               "and drop --code)");
        if (single_use)
            fail(EXIT_SETTING, "legacy doors have no single use (unset KNOCKD_ROTATOR_SINGLE_USE)");
    }
    i128 period;
    if (totp) {
        char var[512];
        snprintf(var, sizeof var, "KNOCKD_ROTATOR_PERIOD_MODULO_%s", door_key);
        period = number_setting("PERIOD_MODULO", getenv(var), 30, 30, 30);
    } else {
        period = number_setting("PERIOD_MODULO", setting("PERIOD_MODULO"), 1, 31622400, 21600);
    }
    int length = (int)number_setting("LENGTH", setting("LENGTH"), 1, 32, 10);
    if (alg == 0 && length < 10)
        fail(EXIT_SETTING, "KNOCKD_ROTATOR_LENGTH below 10 (use 10 to 32)");
    range *ranges = NULL;
    size_t nranges = 0;
    if (alg == 3) {
        const char *ports = setting("PORTS");
        if (!ports || !*ports)
            ports = "2000-65536";
        if (!parse_ports(ports, &ranges, &nranges))
            fail(EXIT_SETTING, "KNOCKD_ROTATOR_PORTS is invalid (ports and LOW-HIGH ranges, "
                               "separated by commas)");
    }
    int port_modulo;
    const char *proto = alg == 3 ? setting("PROTO_MODULO") : NULL;
    if (proto)
        port_modulo = (int)number_setting("PROTO_MODULO", proto, 0, 65535, 0);
    else
        port_modulo = (int)number_setting("PORT_MODULO", setting("PORT_MODULO"), 0, 65535, 0);
    i128 half = period / 2;
    number_setting("GRACE", setting("GRACE"), 0, half, half < 30 ? half : 30);

    /* 4. the code and the PIN (exit 2) */
    if (code && !totp)
        fail(EXIT_USAGE, "a code for a door not in totp mode (drop --code or set MODE=totp)");
    if (totp && !code)
        fail(EXIT_USAGE, "a totp door needs the code (--code 123456)");
    if (want_pin && alg)
        fail(EXIT_USAGE, "legacy doors have no PIN (drop --pin)");
    buf pin = {0};
    put(&pin, "", 0);
    if (want_pin) {
        pin = typed_line();
        if (!pin.n)
            fail(EXIT_USAGE, "empty PIN (type the PIN)");
    } else if (env_pin) {
        put_str(&pin, pin_env);
    }
    char digits[7] = {0};
    if (code) {
        buf raw = {0};
        put(&raw, "", 0);
        if (!strcmp(code, "-"))
            raw = typed_line();
        else
            put_str(&raw, code);
        size_t k = 0, bad = 0;
        for (size_t i = 0; i < raw.n; i++) {
            unsigned char c = raw.p[i];
            if (c == ' ')
                continue;
            if (c < '0' || c > '9' || k >= 6)
                bad = 1;
            else
                digits[k++] = (char)c;
        }
        if (bad || k != 6)
            fail(EXIT_USAGE, "the code must be 6 digits (type the app's code)");
    }

    /* 5. the secret, in secret mode (exit 3) */
    const unsigned char *secret = NULL;
    size_t secretlen = 0;
    if (!totp) {
        const char *s = setting("SECRET");
        const char *name = "SECRET";
        if (!s && alg) {
            s = setting("SALT");
            name = "SALT";
        }
        if (!s)
            fail(EXIT_SETTING, "KNOCKD_ROTATOR_SECRET is not set (set the server's secret)");
        if (!*s)
            fail(EXIT_SETTING, "KNOCKD_ROTATOR_%s is empty (set the server's secret)", name);
        secret = (const unsigned char *)s;
        secretlen = strlen(s);
        if (alg) {
            size_t count;
            free(characters(secret, secretlen, &count));
            if (count < 10)
                fail(EXIT_SETTING, "KNOCKD_ROTATOR_%s shorter than 10 characters", name);
        } else {
            unsigned long long bits = secret_bits(secret, secretlen);
            if (bits < 128)
                fail(EXIT_SETTING, "KNOCKD_ROTATOR_SECRET holds %llu bits, fewer than 128 "
                                   "(use e.g. 32 random bytes in base64)", bits);
        }
    }

    /* 6. --use on a door without single use (exit 2) */
    if (use_text && !single_use)
        fail(EXIT_USAGE, "--use on a door without single use (drop --use)");

    /* 7. the period start (exit 2) */
    const char *now_text = getenv("KRGEN_NOW");
    i128 now = time(NULL);
    if (now_text && !whole_number(now_text, &now))
        fail(EXIT_USAGE, "KRGEN_NOW is not a whole number");
    i128 q = now / period;
    if (now % period != 0 && now < 0)
        q -= 1;
    i128 start = (q + offset) * period;
    if (start > INT64_MAX || start < INT64_MIN)
        fail(EXIT_USAGE, "--offset puts the period start beyond 64 bits (use a smaller one)");
    int64_t period_start = (int64_t)start;

    /* steps 0-4 */
    int ports[32];
    if (alg == 0) {
        unsigned char keybuf[32];
        const unsigned char *key;
        size_t keylen;
        size_t dlen = strlen(door_name);
        if (totp) {
            buf salt = {0};
            put_u32(&salt, 21);
            put_str(&salt, "knockd-rotator/1 totp");
            put_u32(&salt, (uint32_t)dlen);
            put_str(&salt, door_name);
            put_u32(&salt, 6);
            put(&salt, digits, 6);
            pbkdf2(pin.p, pin.n, &salt, keybuf);
            key = keybuf;
            keylen = 32;
        } else if (pin.n) {
            buf salt = {0};
            put_u32(&salt, 23);
            put_str(&salt, "knockd-rotator/1 secret");
            put_u32(&salt, (uint32_t)dlen);
            put_str(&salt, door_name);
            put_u32(&salt, (uint32_t)secretlen);
            put(&salt, secret, secretlen);
            pbkdf2(pin.p, pin.n, &salt, keybuf);
            key = keybuf;
            keylen = 32;
        } else {
            key = secret;
            keylen = secretlen;
        }
        unsigned char usekey[32];
        if (use > 0) {
            buf msg = {0};
            put_str(&msg, "knockd-rotator/1 use");
            put_u32(&msg, (uint32_t)use);
            hmac256(key, keylen, msg.p, msg.n, usekey);
            key = usekey;
            keylen = 32;
        }
        draw_ports(key, keylen, door_name, period_start, length, ports);
    } else {
        int fallback = 0;
        long size = 0;
        if (alg == 3)
            for (size_t i = 0; i < nranges; i++)
                size += ranges[i].hi - ranges[i].lo + 1;
        for (int i = 1; i <= length; i++) {
            uint32_t v = legacy_value(period_start, door_name, secret, secretlen, i);
            long port = alg == 1 ? 2000 + (long)(v % 63536) : port_at(ranges, nranges, (long)(v % size));
            if (port > 65535)
                fallback = 1;
            ports[i - 1] = (int)port;
        }
        if (fallback)
            draw_ports(secret, secretlen, door_name, period_start, length, ports);
    }

    /* output forms */
    buf seq = {0};
    put(&seq, "", 0);
    for (int i = 0; i < length; i++) {
        char item[32];
        int tcp = port_modulo == 0 || ports[i] % port_modulo == 0;
        snprintf(item, sizeof item, "%s%d:%s", i ? (strcmp(format, "knock") ? "," : " ") : "",
                 ports[i], tcp ? "tcp" : "udp");
        put_str(&seq, item);
    }
    if (strcmp(format, "json")) {
        printf("%s\n", seq.p);
        return 0;
    }
    char a[64], b[64];
    printf("{\"door\": ");
    json_string(door_name);
    printf(", \"sequence\": \"%s\", \"ports\": [", seq.p);
    for (int i = 0; i < length; i++) {
        int tcp = port_modulo == 0 || ports[i] % port_modulo == 0;
        printf("%s{\"port\": %d, \"protocol\": \"%s\"}", i ? ", " : "", ports[i],
               tcp ? "tcp" : "udp");
    }
    printf("], \"period_start\": %s, \"period_end\": %s}\n", i128_text(start, a),
           i128_text(start + period, b));
    return 0;
}
