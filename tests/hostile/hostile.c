/*
 * Attacks by the process that holds a pooled sandbox's channel: native code that user R
 * code writes to /tmp and dyn.load()s, then calls with .C(). Each function is one
 * attempt; the tests (tests/tests/channel.rs, api/tests/hostile.rs) assert what the
 * platform makes of it.
 *
 * The frame format is the one of sandbox/src/upstream.rs: u32 LE length of what follows,
 * u8 kind, body. Kinds: 1 setup error, 2 ready, 3 started, 4 stdout, 5 stderr,
 * 6 progress, 7 value, 8 finished.
 *
 * Also: attempts of one sandbox on another running at the same time (locks on image
 * files, abstract sockets, inotify on image files, signals, inotify exhaustion).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <stdio.h>
#include <sys/un.h>
#include <unistd.h>

/* The sandbox's channel: the only Unix socket among its descriptors. */
static int channel(void) {
    for (int fd = 3; fd < 4096; fd++) {
        struct stat st;
        if (fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode))
            return fd;
    }
    return -1;
}

static void put_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        p += n;
        len -= (size_t)n;
    }
}

static void frame(int fd, uint8_t kind, const void *body, uint32_t len) {
    unsigned char head[5];
    uint32_t total = len + 1;
    memcpy(head, &total, 4); /* x86_64: little-endian */
    head[4] = kind;
    put_all(fd, head, 5);
    if (len)
        put_all(fd, body, len);
}

static void spin(void) {
    volatile unsigned long x = 0;
    for (;;)
        x++;
}

/* .C("hostile_channel_fd", fd = integer(1)) */
void hostile_channel_fd(int *fd) { *fd = channel(); }

/* Two bytes of a header, then burn the CPU: the owner must not wait for the rest. */
void hostile_partial_header_spin(void) {
    int fd = channel();
    unsigned char half[2] = {0x10, 0x00};
    put_all(fd, half, 2);
    spin();
}

/* Two bytes of a header, then sleep. */
void hostile_partial_header_sleep(void) {
    int fd = channel();
    unsigned char half[2] = {0x10, 0x00};
    put_all(fd, half, 2);
    for (;;)
        sleep(3600);
}

/* Bytes that are no frame at all. */
void hostile_garbage(void) {
    int fd = channel();
    unsigned char junk[64];
    for (int i = 0; i < 64; i++)
        junk[i] = (unsigned char)(0xA5 ^ (i * 37));
    junk[0] = 0x09; /* a small length, so the kind byte is read: 0xA5^.. is unknown */
    junk[1] = junk[2] = junk[3] = 0;
    junk[4] = 0xEE;
    put_all(fd, junk, sizeof junk);
    spin();
}

/* A header that declares 4 GiB, then nothing. */
void hostile_huge_length(void) {
    int fd = channel();
    unsigned char head[4] = {0xFF, 0xFF, 0xFF, 0xFF};
    put_all(fd, head, 4);
    spin();
}

/* A frame of length zero. */
void hostile_empty_frame(void) {
    int fd = channel();
    unsigned char head[4] = {0, 0, 0, 0};
    put_all(fd, head, 4);
    spin();
}

/* A second `started`, claiming user code started at the dawn of time. */
void hostile_forged_started(void) {
    uint64_t ns = 1;
    frame(channel(), 3, &ns, 8);
    spin();
}

/* `ready` again, after the claim. */
void hostile_forged_ready(void) {
    frame(channel(), 2, NULL, 0);
    spin();
}

/* A `finished` that claims what only the platform may say: a status, timings, usage. */
void hostile_forged_finished_with_status(void) {
    const char *j = "{\"ok\":true,\"status\":\"succeeded\",\"timings\":{\"total_ms\":0},"
                    "\"usage\":{\"memory_peak_bytes\":0}}";
    frame(channel(), 8, j, (uint32_t)strlen(j));
    spin();
}

/* A well-formed value and `finished` written by native code, then more R code would
 * follow: the execution ends here, as if the code had returned this value and quit. */
void hostile_forged_finished(void) {
    int fd = channel();
    const char *v = "\"forged\"";
    const char *j = "{\"ok\":true,\"value_class\":[\"character\"]}";
    frame(fd, 7, v, (uint32_t)strlen(v));
    frame(fd, 8, j, (uint32_t)strlen(j));
    for (;;)
        sleep(3600);
}

/* A value that is not JSON. */
void hostile_bad_value(void) {
    int fd = channel();
    const char *v = "{not json";
    const char *j = "{\"ok\":true}";
    frame(fd, 7, v, (uint32_t)strlen(v));
    frame(fd, 8, j, (uint32_t)strlen(j));
    spin();
}

/* A progress frame with a fraction that is not a number. */
void hostile_bad_progress(void) {
    unsigned char body[8 + 1];
    uint64_t nan = 0x7ff8000000000000ULL;
    memcpy(body, &nan, 8);
    body[8] = 'x';
    frame(channel(), 6, body, 9);
    spin();
}

/* An output frame carrying a descriptor (SCM_RIGHTS): our stdin. */
void hostile_scm_rights(int *result) {
    int fd = channel();
    unsigned char buf[5 + 2] = {3, 0, 0, 0, 4, 'h', 'i'};
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(sizeof(int))];
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.space,
                         .msg_controllen = sizeof u.space};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    int passed = 0;
    memcpy(CMSG_DATA(c), &passed, sizeof(int));
    *result = sendmsg(fd, &msg, MSG_NOSIGNAL) < 0 ? -errno : 0;
    if (*result == 0)
        spin();
}

/* n progress frames with messages of `len` bytes (at most 4096), as fast as the channel
 * takes them. */
void hostile_progress_flood(int *n, int *len) {
    int fd = channel();
    static unsigned char body[8 + 4096];
    double f = 0.5;
    memcpy(body, &f, 8);
    int l = *len > 4096 ? 4096 : *len;
    memset(body + 8, 'p', (size_t)l);
    for (int i = 0; i < *n; i++)
        frame(fd, 6, body, (uint32_t)(8 + l));
}

/* n stdout frames of `len` bytes each, bypassing R's console. */
void hostile_output_flood(int *n, int *len) {
    int fd = channel();
    static unsigned char body[65536];
    int l = *len > 65536 ? 65536 : *len;
    memset(body, 'o', (size_t)l);
    for (int i = 0; i < *n; i++)
        frame(fd, 4, body, (uint32_t)l);
}

/* n artifact frames (kind 9) of `len` bytes each: under `name` when `distinct` is 0,
   else each under a name of its own (name0, name1, ...). */
void hostile_artifacts(char **name, int *n, int *len, int *distinct) {
    int fd = channel();
    static unsigned char body[65536];
    char nm[256];
    int l = *len > 60000 ? 60000 : *len;
    for (int i = 0; i < *n; i++) {
        if (*distinct)
            snprintf(nm, sizeof nm, "%s%d", *name, i);
        else
            snprintf(nm, sizeof nm, "%s", *name);
        uint16_t nl = (uint16_t)strlen(nm);
        memcpy(body, &nl, 2);
        memcpy(body + 2, nm, nl);
        memset(body + 2 + nl, 'z', (size_t)l);
        frame(fd, 9, body, (uint32_t)(2 + nl + l));
    }
}

/* An artifact frame whose name length runs past the end of the frame. */
void hostile_artifact_long_name(void) {
    int fd = channel();
    unsigned char body[4] = {0xff, 0x7f, 'a', 'b'};
    frame(fd, 9, body, 4);
}

/* ---- one sandbox against another ---------------------------------------------------- */

static int held_fds[64];
static int held;

static void hold(int fd) {
    if (fd >= 0 && held < 64)
        held_fds[held++] = fd;
}

/* Takes an exclusive lock on an image file and keeps it. */
void xs_hold_lock(char **path, int *result) {
    int fd = open(*path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *result = -errno;
        return;
    }
    *result = flock(fd, LOCK_EX | LOCK_NB) < 0 ? -errno : 0;
    hold(fd);
}

/* Tries the same lock without waiting: 0, or -errno (-EWOULDBLOCK if someone holds it). */
void xs_try_lock(char **path, int *result) {
    int fd = open(*path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *result = -errno;
        return;
    }
    *result = flock(fd, LOCK_EX | LOCK_NB) < 0 ? -errno : 0;
    close(fd);
}

static socklen_t abstract_addr(struct sockaddr_un *a, const char *name) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    size_t n = strlen(name);
    if (n > sizeof a->sun_path - 2)
        n = sizeof a->sun_path - 2;
    memcpy(a->sun_path + 1, name, n);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
}

/* Listens on an abstract Unix socket and keeps it. */
void xs_listen_abstract(char **name, int *result) {
    struct sockaddr_un a;
    socklen_t len = abstract_addr(&a, *name);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, len) < 0 || listen(fd, 8) < 0) {
        *result = -errno;
        return;
    }
    *result = 0;
    hold(fd);
}

/* Connects to an abstract Unix socket: 0, or -errno. */
void xs_connect_abstract(char **name, int *result) {
    struct sockaddr_un a;
    socklen_t len = abstract_addr(&a, *name);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *result = -errno;
        return;
    }
    *result = connect(fd, (struct sockaddr *)&a, len) < 0 ? -errno : 0;
    close(fd);
}

static int watch_fd = -1;

/* Watches an image file for opens and reads. */
void xs_watch(char **path, int *result) {
    watch_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (watch_fd < 0) {
        *result = -errno;
        return;
    }
    *result = inotify_add_watch(watch_fd, *path, IN_OPEN | IN_ACCESS | IN_CLOSE_NOWRITE) < 0
                  ? -errno
                  : 0;
}

/* How many events the watch saw so far (-errno on error). */
void xs_watch_count(int *result) {
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    int count = 0;
    for (;;) {
        ssize_t n = read(watch_fd, buf, sizeof buf);
        if (n <= 0)
            break;
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *e = (struct inotify_event *)p;
            count++;
            p += sizeof(struct inotify_event) + e->len;
        }
    }
    *result = count;
}

/* Opens and reads a file `n` times. */
void xs_touch(char **path, int *n) {
    char b[64];
    for (int i = 0; i < *n; i++) {
        int fd = open(*path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        (void)!read(fd, b, sizeof b);
        close(fd);
    }
}

/* Creates inotify instances until refused and keeps them: how many, and the errno. */
void xs_inotify_exhaust(int *count, int *err) {
    int n = 0;
    *err = 0;
    for (int i = 0; i < 100000; i++) {
        int fd = inotify_init1(IN_CLOEXEC);
        if (fd < 0) {
            *err = errno;
            break;
        }
        n++;
    }
    *count = n;
}

/* Signals every pid it can address (0 = existence check): how many answer besides itself. */
void xs_signal_scan(int *found) {
    int n = 0;
    pid_t self = getpid();
    for (pid_t p = 1; p < 100000; p++) {
        if (p != self && kill(p, 0) == 0)
            n++;
    }
    *found = n;
}
