/*
 * moe_net.h — socket helpers shared by the service (rank 0's listener) and the client library:
 * listen on / connect to a moe_proto_addr, and blocking-with-deadline reads and writes for the
 * client. Internal.
 */
#ifndef MOE_NET_H
#define MOE_NET_H

#include <stddef.h>

#include "common.h"
#include "moe_proto.h"

/* Bind and listen; the fd is non-blocking and close-on-exec. A Unix socket path that exists
 * and is a socket nobody listens on (a stale one) is replaced; one that someone answers on is
 * an error (another server). bound (optional, >= 300 bytes) receives the address actually
 * bound, "tcp:127.0.0.1:41234" when PORT was 0. */
moe_status moe_net_listen(const moe_proto_addr *a, int backlog, int *fd, char *bound,
                          size_t boundlen, moe_error *err);
/* Connect (blocking fd, close-on-exec, TCP_NODELAY on TCP) within timeout_ms (<= 0: 30 s). */
moe_status moe_net_connect(const moe_proto_addr *a, int timeout_ms, int *fd, moe_error *err);
moe_status moe_net_set_nonblock(int fd, moe_error *err);

/* Write / read exactly n bytes before the deadline (moe_now() seconds; <= 0: none). Writes use
 * MSG_NOSIGNAL (a peer that went away is MOE_ERR_IO, never SIGPIPE). A read that meets EOF is
 * MOE_ERR_IO "connection closed by the peer"; the deadline passing is MOE_ERR_TIMEOUT. */
moe_status moe_net_write_all(int fd, const void *buf, size_t n, double deadline, moe_error *err);
moe_status moe_net_read_all(int fd, void *buf, size_t n, double deadline, moe_error *err);

#endif /* MOE_NET_H */
