/*
 * ztunnel-cni: the CNI plugin binary the container runtime runs on the node.
 *
 * The runtime runs plugins on the host, where the mesh's Python is not, so
 * this is a small static program that forwards each call to the node agent,
 * which does the work (ztunnel/nodeagent/plugin.py says what, and how it
 * answers):
 *
 *   request (one line, to <runDir>/plugin.sock):
 *     {"cmd":"cni","env":{"CNI_COMMAND":"ADD",...},"config":"<stdin, as a JSON string>"}
 *   answer: the exit code in decimal, a newline, then what to print, to EOF.
 *
 * What it decides alone is only what must work while the agent is away:
 *   VERSION      answered here;
 *   DEL, CHECK,  succeed: DEL must release what it can, the agent forgets a pod
 *   GC, STATUS   whose netns is gone; failing STATUS would take the node's whole
 *                pod network down with the agent;
 *   ADD          a pod of a namespace in the entry's "excludeNamespaces" (the
 *                agent's own, kube-system), or of one the agent last listed as
 *                not ambient (<runDir>/ambient-namespaces.json), starts: the
 *                previous plugin's result is passed on, and the call is kept
 *                in <runDir>/pending/ for the agent to record when it is back.
 *                Any other pod fails with "try again later" (11): it must not
 *                start uncaptured, and the runtime retries.
 *
 * Standard C and Linux only, built static (make), so it runs on any node.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_INPUT (16 * 1024 * 1024)
#define MAX_ANSWER (16 * 1024 * 1024)
#define DEFAULT_TIMEOUT_S 30.0

/* CNI's error codes (spec 1.0, "Error"); 100+ are ours. Keep in step with plugin.py. */
#define ERR_INCOMPATIBLE_VERSION 1
#define ERR_INVALID_ENV 4
#define ERR_IO 5
#define ERR_DECODING 6
#define ERR_TRY_AGAIN 11

static const char SUPPORTED_VERSIONS[] = "[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]";
static const char *FORWARDED_ENV[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
                                      "CNI_IFNAME",  "CNI_ARGS",        "CNI_PATH", NULL};

/* -- a growable byte buffer ------------------------------------------------------------- */

typedef struct {
    char *data;
    size_t len, cap;
} buf_t;

static void buf_put(buf_t *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1) cap *= 2;
        char *data = realloc(b->data, cap);
        if (!data) {
            fputs("ztunnel-cni: out of memory\n", stderr);
            exit(2);
        }
        b->data = data;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void buf_str(buf_t *b, const char *s) { buf_put(b, s, strlen(s)); }

/* s as the inside of a JSON string: quote, backslash and control bytes escaped. */
static void buf_json(buf_t *b, const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            buf_put(b, esc, 2);
        } else if (c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            buf_put(b, esc, 6);
        } else {
            buf_put(b, (const char *)&s[i], 1);
        }
    }
}

static int read_fd(int fd, buf_t *b, size_t limit) {
    char chunk[65536];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) return 0;
        if (b->len + (size_t)n > limit) {
            errno = EFBIG;
            return -1;
        }
        buf_put(b, chunk, (size_t)n);
    }
}

/* -- just enough JSON: find a top-level member, read plain strings ----------------------- */

static const char *ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

/* Past the string starting at p (a '"'), or NULL. */
static const char *skip_string(const char *p, const char *end) {
    for (p++; p < end; p++) {
        if (*p == '\\') {
            p++;
        } else if (*p == '"') {
            return p + 1;
        }
    }
    return NULL;
}

/* Past the value starting at p, or NULL; nesting is bounded by the input's size. */
static const char *skip_value(const char *p, const char *end) {
    p = ws(p, end);
    if (p >= end) return NULL;
    if (*p == '"') return skip_string(p, end);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (p < end) {
            if (*p == '"') {
                p = skip_string(p, end);
                if (!p) return NULL;
                continue;
            }
            if (*p == '{' || *p == '[') depth++;
            if (*p == '}' || *p == ']') {
                if (--depth == 0) return p + 1;
            }
            p++;
        }
        return NULL;
    }
    while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\n' &&
           *p != '\r' && *p != '\t')
        p++;
    return p;
}

/* The value of member `key` of the object in [p, end): its span, or 0 when absent. */
static int member(const char *p, const char *end, const char *key, const char **vs,
                  const char **ve) {
    size_t klen = strlen(key);
    p = ws(p, end);
    if (p >= end || *p != '{') return 0;
    p++;
    for (;;) {
        p = ws(p, end);
        if (p >= end || *p != '"') return 0;
        const char *ks = p + 1, *kend = skip_string(p, end);
        if (!kend) return 0;
        p = ws(kend, end);
        if (p >= end || *p != ':') return 0;
        const char *v = ws(p + 1, end), *vend = skip_value(v, end);
        if (!vend) return 0;
        if ((size_t)(kend - 1 - ks) == klen && memcmp(ks, key, klen) == 0) {
            *vs = v;
            *ve = vend;
            return 1;
        }
        p = ws(vend, end);
        if (p < end && *p == ',') {
            p++;
            continue;
        }
        return 0;
    }
}

/* A string value without escapes, copied into out (NUL-terminated); 0 if it is not one. */
static int plain_string(const char *vs, const char *ve, char *out, size_t size) {
    if (ve - vs < 2 || *vs != '"' || ve[-1] != '"') return 0;
    size_t n = (size_t)(ve - vs - 2);
    if (n >= size || memchr(vs + 1, '\\', n)) return 0;
    memcpy(out, vs + 1, n);
    out[n] = '\0';
    return 1;
}

/* Whether the array in [p, end) holds the plain string `want`; -1 if it is no array. */
static int array_has(const char *p, const char *end, const char *want) {
    char item[512];
    p = ws(p, end);
    if (p >= end || *p != '[') return -1;
    p = ws(p + 1, end);
    if (p < end && *p == ']') return 0;
    while (p < end) {
        const char *ve = skip_value(p, end);
        if (!ve) return -1;
        if (plain_string(p, ve, item, sizeof item) && strcmp(item, want) == 0) return 1;
        p = ws(ve, end);
        if (p < end && *p == ',') {
            p = ws(p + 1, end);
            continue;
        }
        return (p < end && *p == ']') ? 0 : -1;
    }
    return -1;
}

/* -- output ----------------------------------------------------------------------------- */

static char version[64] = "1.0.0";

static void write_all(int fd, const char *s, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, s, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

static int fail(int code, const char *details, const char *fmt, ...) {
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    buf_t out = {0};
    buf_str(&out, "{\"cniVersion\":\"");
    buf_json(&out, version, strlen(version));
    char num[32];
    snprintf(num, sizeof num, "\",\"code\":%d,\"msg\":\"", code);
    buf_str(&out, num);
    buf_json(&out, msg, strlen(msg));
    if (details && *details) {
        buf_str(&out, "\",\"details\":\"");
        buf_json(&out, details, strlen(details));
    }
    buf_str(&out, "\"}\n");
    write_all(1, out.data, out.len);
    return 1;
}

/* -- the agent ---------------------------------------------------------------------------- */

/* Send the request; on an answer, print it and set *rc. -1 (errno set) if unreachable. */
static int ask_agent(const char *sock_path, const buf_t *request, double timeout_s, int *rc,
                     char *why, size_t why_size) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(sock_path) >= sizeof addr.sun_path) {
        snprintf(why, why_size, "socket path too long: %s", sock_path);
        return -1;
    }
    strcpy(addr.sun_path, sock_path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(why, why_size, "socket: %s", strerror(errno));
        return -1;
    }
    struct timeval tv = {.tv_sec = (time_t)timeout_s,
                         .tv_usec = (suseconds_t)((timeout_s - (double)(time_t)timeout_s) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        snprintf(why, why_size, "connect %s: %s", sock_path, strerror(errno));
        close(fd);
        return -1;
    }
    const char *p = request->data;
    size_t left = request->len;
    while (left > 0) {
        ssize_t w = send(fd, p, left, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            snprintf(why, why_size, "send to %s: %s", sock_path, strerror(errno));
            close(fd);
            return -1;
        }
        p += w;
        left -= (size_t)w;
    }
    buf_t answer = {0};
    if (read_fd(fd, &answer, MAX_ANSWER) < 0) {
        snprintf(why, why_size, "no answer from %s: %s", sock_path,
                 errno == EAGAIN ? "timed out" : strerror(errno));
        close(fd);
        free(answer.data);
        return -1;
    }
    close(fd);
    char *nl = answer.data ? memchr(answer.data, '\n', answer.len) : NULL;
    char *endp = NULL;
    long code = nl ? strtol(answer.data, &endp, 10) : -1;
    if (!nl || endp != nl || code < 0 || code > 255) {
        snprintf(why, why_size, "the agent at %s gave no answer (it may have stopped)", sock_path);
        free(answer.data);
        return -1;
    }
    write_all(1, nl + 1, answer.len - (size_t)(nl + 1 - answer.data));
    *rc = (int)code;
    free(answer.data);
    return 0;
}

/* The value of `key` ("K8S_POD_NAMESPACE=") in CNI_ARGS ("K=V;K=V"), or "". */
static void cni_arg(const char *args, const char *key, char *out, size_t size) {
    size_t klen = strlen(key);
    out[0] = '\0';
    for (const char *p = args; p && *p;) {
        const char *semi = strchr(p, ';');
        size_t n = semi ? (size_t)(semi - p) : strlen(p);
        if (n > klen && strncmp(p, key, klen) == 0 && n - klen < size) {
            memcpy(out, p + klen, n - klen);
            out[n - klen] = '\0';
        }
        p = semi ? semi + 1 : NULL;
    }
}

static int plain_id(const char *s) {
    if (!*s || *s == '.' || strlen(s) > 128) return 0;
    for (; *s; s++) {
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_' || *s == '-' || *s == '.'))
            return 0;
    }
    return 1;
}

/* Keep the call in <runDir>/pending/<id>.json for the agent (best effort). */
static void keep_pending(const char *run_dir, const char *id, const buf_t *request) {
    char dir[1100], tmp[1400], path[1400];
    if (!plain_id(id)) return;
    snprintf(dir, sizeof dir, "%s/pending", run_dir);
    if (mkdir(dir, 0700) < 0 && errno != EEXIST) return;
    snprintf(tmp, sizeof tmp, "%s/.%s.%d.tmp", dir, id, (int)getpid());
    snprintf(path, sizeof path, "%s/%s.json", dir, id);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return;
    write_all(fd, request->data, request->len);
    if (fsync(fd) == 0 && close(fd) == 0) {
        if (rename(tmp, path) < 0) unlink(tmp);
    } else {
        unlink(tmp);
    }
}

/* 1: the agent said the namespace is not ambient; 0: it is, or nobody knows. */
static int known_outside_mesh(const char *run_dir, const char *ns) {
    char path[1100];
    snprintf(path, sizeof path, "%s/ambient-namespaces.json", run_dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    buf_t hint = {0};
    int ok = read_fd(fd, &hint, MAX_INPUT) == 0 && hint.data;
    close(fd);
    int has = ok ? array_has(hint.data, hint.data + hint.len, ns) : -1;
    free(hint.data);
    return has == 0;
}

int main(void) {
    const char *command = getenv("CNI_COMMAND");
    command = command ? command : "";
    buf_t in = {0};
    if (read_fd(0, &in, MAX_INPUT) < 0) return fail(ERR_IO, strerror(errno), "cannot read stdin");
    const char *cfg = in.data ? in.data : "{}", *cfg_end = cfg + (in.data ? in.len : 2);
    const char *vs, *ve;
    if (member(cfg, cfg_end, "cniVersion", &vs, &ve) && !plain_string(vs, ve, version, sizeof version))
        snprintf(version, sizeof version, "1.0.0");
    if (strcmp(command, "VERSION") == 0) {
        buf_t out = {0};
        buf_str(&out, "{\"cniVersion\":\"");
        buf_json(&out, version, strlen(version));
        buf_str(&out, "\",\"supportedVersions\":");
        buf_str(&out, SUPPORTED_VERSIONS);
        buf_str(&out, "}\n");
        write_all(1, out.data, out.len);
        return 0;
    }
    const char *p = ws(cfg, cfg_end);
    if (p >= cfg_end || *p != '{' || !skip_value(p, cfg_end) || ws(skip_value(p, cfg_end), cfg_end) != cfg_end)
        return fail(ERR_DECODING, NULL, "the plugin config on stdin is not a JSON object");
    char run_dir[1024];
    if (!member(cfg, cfg_end, "runDir", &vs, &ve) || !plain_string(vs, ve, run_dir, sizeof run_dir) ||
        !run_dir[0])
        return fail(ERR_DECODING, NULL, "the plugin config needs 'runDir' (the node agent's dir)");
    double timeout_s = DEFAULT_TIMEOUT_S;
    if (member(cfg, cfg_end, "timeoutSeconds", &vs, &ve)) {
        char num[64];
        size_t n = (size_t)(ve - vs);
        char *endp;
        if (n >= sizeof num) return fail(ERR_DECODING, NULL, "'timeoutSeconds' must be a number");
        memcpy(num, vs, n);
        num[n] = '\0';
        timeout_s = strtod(num, &endp);
        if (endp == num || *endp || !(timeout_s > 0 && timeout_s <= 3600))
            return fail(ERR_DECODING, NULL, "'timeoutSeconds' must be a number");
    }

    buf_t request = {0};
    buf_str(&request, "{\"cmd\":\"cni\",\"env\":{");
    int first = 1;
    for (const char **k = FORWARDED_ENV; *k; k++) {
        const char *v = getenv(*k);
        if (!v) continue;
        buf_str(&request, first ? "\"" : ",\"");
        buf_str(&request, *k);
        buf_str(&request, "\":\"");
        buf_json(&request, v, strlen(v));
        buf_str(&request, "\"");
        first = 0;
    }
    buf_str(&request, "},\"config\":\"");
    buf_json(&request, in.data ? in.data : "", in.data ? in.len : 0);
    buf_str(&request, "\"}\n");

    char sock_path[1100], why[2048];
    snprintf(sock_path, sizeof sock_path, "%s/plugin.sock", run_dir);
    int rc;
    if (ask_agent(sock_path, &request, timeout_s, &rc, why, sizeof why) == 0) return rc;

    /* The agent is away. */
    if (strcmp(command, "ADD") != 0) return 0; /* DEL, CHECK, GC, STATUS */
    char ns[256], name[256];
    cni_arg(getenv("CNI_ARGS"), "K8S_POD_NAMESPACE=", ns, sizeof ns);
    cni_arg(getenv("CNI_ARGS"), "K8S_POD_NAME=", name, sizeof name);
    const char *id = getenv("CNI_CONTAINERID");
    int outside = 0;
    if (ns[0] && member(cfg, cfg_end, "excludeNamespaces", &vs, &ve) && array_has(vs, ve, ns) == 1)
        outside = 1;
    if (ns[0] && !outside) outside = known_outside_mesh(run_dir, ns);
    if (outside && member(cfg, cfg_end, "prevResult", &vs, &ve) && *vs == '{') {
        keep_pending(run_dir, id ? id : "", &request);
        write_all(1, vs, (size_t)(ve - vs));
        write_all(1, "\n", 1);
        return 0;
    }
    if (outside) return fail(ERR_DECODING, NULL, "ztunnel-cni must be chained after the plugin that wires the pod (no prevResult)");
    return fail(ERR_TRY_AGAIN, why,
                "the ztunnel node agent at %s cannot be reached, and pod %s/%s may belong to the "
                "mesh: not starting it uncaptured",
                sock_path, ns[0] ? ns : "?", name[0] ? name : "?");
}
