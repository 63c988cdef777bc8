/* moe_net.c — see moe_net.h. */
#include "moe_net.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

moe_status moe_net_set_nonblock(int fd, moe_error *err)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return moe_fail(err, MOE_ERR_IO, "fcntl(O_NONBLOCK): %s", strerror(errno));
    return MOE_OK;
}

static void fill_unix(const moe_proto_addr *a, struct sockaddr_un *sa)
{
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    memcpy(sa->sun_path, a->path, strnlen(a->path, sizeof sa->sun_path - 1));
}

/* Is someone accepting on this Unix socket path? (A stale file left by a killed server is not.) */
static bool unix_path_live(const moe_proto_addr *a)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return true; /* cannot tell: be safe, refuse to unlink */
    struct sockaddr_un sa;
    fill_unix(a, &sa);
    bool live = connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
    close(fd);
    return live;
}

moe_status moe_net_listen(const moe_proto_addr *a, int backlog, int *fd_out, char *bound,
                          size_t boundlen, moe_error *err)
{
    *fd_out = -1;
    if (a->is_unix) {
        struct stat stt;
        if (lstat(a->path, &stt) == 0) {
            if (!S_ISSOCK(stt.st_mode))
                return moe_fail(err, MOE_ERR_INVALID_ARG,
                                "listen unix:%s: the path exists and is not a socket; refusing "
                                "to replace it", a->path);
            if (unix_path_live(a))
                return moe_fail(err, MOE_ERR_IO,
                                "listen unix:%s: another server is accepting on this socket",
                                a->path);
            unlink(a->path); /* stale socket of a server that died */
        }
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return moe_fail(err, MOE_ERR_IO, "socket(AF_UNIX): %s", strerror(errno));
        struct sockaddr_un sa;
        fill_unix(a, &sa);
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, backlog) != 0) {
            int e = errno;
            close(fd);
            return moe_fail(err, MOE_ERR_IO, "listen unix:%s: %s", a->path, strerror(e));
        }
        moe_status st = moe_net_set_nonblock(fd, err);
        if (st != MOE_OK) { close(fd); return st; }
        if (bound) snprintf(bound, boundlen, "unix:%s", a->path);
        *fd_out = fd;
        return MOE_OK;
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    int gai = getaddrinfo(a->host, a->port, &hints, &res);
    if (gai != 0)
        return moe_fail(err, MOE_ERR_IO, "listen tcp:%s:%s: %s", a->host, a->port, gai_strerror(gai));
    moe_status st = MOE_ERR_IO;
    int last = 0;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) { last = errno; continue; }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, backlog) != 0) {
            last = errno;
            close(fd);
            continue;
        }
        if ((st = moe_net_set_nonblock(fd, err)) != MOE_OK) { close(fd); break; }
        if (bound) {
            struct sockaddr_storage ss;
            socklen_t sl = sizeof ss;
            char h[NI_MAXHOST], p[NI_MAXSERV];
            if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 &&
                getnameinfo((struct sockaddr *)&ss, sl, h, sizeof h, p, sizeof p,
                            NI_NUMERICHOST | NI_NUMERICSERV) == 0)
                snprintf(bound, boundlen, ss.ss_family == AF_INET6 ? "tcp:[%s]:%s" : "tcp:%s:%s", h, p);
            else
                snprintf(bound, boundlen, "tcp:%s:%s", a->host, a->port);
        }
        *fd_out = fd;
        st = MOE_OK;
        break;
    }
    freeaddrinfo(res);
    if (st != MOE_OK && *fd_out < 0 && last)
        return moe_fail(err, MOE_ERR_IO, "listen tcp:%s:%s: %s", a->host, a->port, strerror(last));
    return st;
}

/* Wait for fd to be ready for `events` until the deadline. */
static moe_status wait_fd(int fd, short events, double deadline, const char *what, moe_error *err)
{
    for (;;) {
        int ms = -1;
        if (deadline > 0) {
            double left = deadline - moe_now();
            if (left <= 0) return moe_fail(err, MOE_ERR_TIMEOUT, "%s: timed out", what);
            ms = (int)(left * 1000.0) + 1;
        }
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, ms);
        if (r > 0) return MOE_OK;
        if (r < 0 && errno != EINTR) return moe_fail(err, MOE_ERR_IO, "%s: poll: %s", what, strerror(errno));
    }
}

moe_status moe_net_connect(const moe_proto_addr *a, int timeout_ms, int *fd_out, moe_error *err)
{
    *fd_out = -1;
    double deadline = moe_now() + (timeout_ms > 0 ? timeout_ms : 30000) / 1000.0;
    if (a->is_unix) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return moe_fail(err, MOE_ERR_IO, "socket(AF_UNIX): %s", strerror(errno));
        struct sockaddr_un sa;
        fill_unix(a, &sa);
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
            int e = errno;
            close(fd);
            return moe_fail(err, MOE_ERR_IO, "connect unix:%s: %s", a->path, strerror(e));
        }
        *fd_out = fd;
        return MOE_OK;
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int gai = getaddrinfo(a->host, a->port, &hints, &res);
    if (gai != 0)
        return moe_fail(err, MOE_ERR_IO, "connect tcp:%s:%s: %s", a->host, a->port, gai_strerror(gai));
    int last = ECONNREFUSED;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) { last = errno; continue; }
        /* Non-blocking connect so the timeout applies, then back to blocking. */
        int fl = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
        int r = connect(fd, ai->ai_addr, ai->ai_addrlen);
        if (r != 0 && errno == EINPROGRESS) {
            moe_error werr = {0};
            if (wait_fd(fd, POLLOUT, deadline, "connect", &werr) != MOE_OK) {
                last = ETIMEDOUT;
                close(fd);
                continue;
            }
            int soerr = 0;
            socklen_t sl = sizeof soerr;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
            r = soerr ? -1 : 0;
            if (soerr) errno = soerr;
        }
        if (r != 0) { last = errno; close(fd); continue; }
        fcntl(fd, F_SETFL, fl);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        *fd_out = fd;
        break;
    }
    freeaddrinfo(res);
    if (*fd_out < 0)
        return moe_fail(err, last == ETIMEDOUT ? MOE_ERR_TIMEOUT : MOE_ERR_IO,
                        "connect tcp:%s:%s: %s", a->host, a->port, strerror(last));
    return MOE_OK;
}

moe_status moe_net_write_all(int fd, const void *buf, size_t n, double deadline, moe_error *err)
{
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            MOE_TRY(wait_fd(fd, POLLOUT, deadline, "send", err));
            continue;
        }
        return moe_fail(err, MOE_ERR_IO, "send: %s", w < 0 ? strerror(errno) : "wrote nothing");
    }
    return MOE_OK;
}

moe_status moe_net_read_all(int fd, void *buf, size_t n, double deadline, moe_error *err)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = recv(fd, p, n, MSG_DONTWAIT);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
            continue;
        }
        if (r == 0) return moe_fail(err, MOE_ERR_IO, "connection closed by the peer");
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            MOE_TRY(wait_fd(fd, POLLIN, deadline, "recv", err));
            continue;
        }
        return moe_fail(err, MOE_ERR_IO, "recv: %s", strerror(errno));
    }
    return MOE_OK;
}
