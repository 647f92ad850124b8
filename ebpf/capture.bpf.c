// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The eBPF capture backend: what the in-pod iptables rules do, as programs
 * that stay inside the pod (its cgroup and its own interfaces), so they
 * cannot conflict with the node's CNI.
 *
 *   zt_connect4   cgroup/connect4 on the pod's cgroup: a TCP connect is sent
 *                 to the pod's own ztunnel listener podIP:15001 (DNS to 53:
 *                 127.0.0.1:15053), the destination asked for kept under the
 *                 socket's cookie. UDP connects to 53 go to 127.0.0.1:15053.
 *   zt_sockops    sockops on the pod's cgroup: when such a connect has its
 *                 4-tuple (TCP_CONNECT_CB, before the SYN leaves), the
 *                 destination moves to zt_orig_dst under that 4-tuple, where
 *                 ztunnel reads it back on accept (its SO_ORIGINAL_DST).
 *   zt_sendmsg4   cgroup/sendmsg4: UDP datagrams to 53 go to 127.0.0.1:15053.
 *   zt_recvmsg4   cgroup/recvmsg4: their answers look as if they came from
 *                 the server asked.
 *   zt_ingress    tc ingress on the pod's own interfaces, inside its netns:
 *                 a new inbound TCP connection (not to 15008, not a kubelet
 *                 probe) is given to ztunnel's 15006 listener with
 *                 bpf_sk_assign; the accepted socket's local address is the
 *                 destination asked for. No listener (ztunnel down): the
 *                 packet is dropped, never delivered around ztunnel.
 *
 * ztunnel's own sockets are created by ztunnel's process, whose cgroup is not
 * the pod's: the cgroup programs never see them. The pod is found by its
 * network namespace's cookie in zt_pods; a pod whose entry is missing while
 * the programs are attached has its connects refused (fail closed).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define OUTBOUND_PORT 15001
#define INBOUND_PLAINTEXT_PORT 15006
#define HBONE_PORT 15008
#define DNS_PORT 15053
#define PROBE_SNAT_IP 0xa9fe077f /* 169.254.7.127 */
#define LOOPBACK_NET 0x7f000000
#define LOOPBACK_MASK 0xff000000
#define LOCALHOST 0x7f000001

#define POD_DNS_CAPTURE 1

struct pod_info {
	__u32 ip4;       /* network order */
	__u32 flags;     /* POD_DNS_CAPTURE; the others are the agent's own (see capture.py) */
	__u64 cgroup_id; /* the cgroup the programs are attached to, for diagnostics */
};

struct orig_dst {
	__u32 ip4;  /* network order */
	__u16 port; /* network order */
	__u16 pad;
};

struct tuple4 {
	__u32 src_ip4; /* network order */
	__u32 dst_ip4;
	__u16 src_port; /* host order */
	__u16 dst_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64); /* the pod netns's cookie */
	__type(value, struct pod_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* socket cookie */
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_cookie_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tuple4);
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} zt_orig_dst SEC(".maps");

static __always_inline int is_loopback(__u32 ip4)
{
	return (bpf_ntohl(ip4) & LOOPBACK_MASK) == LOOPBACK_NET;
}

static __always_inline void remember(void *ctx, __u32 ip4, __u32 port)
{
	struct orig_dst dst = {.ip4 = ip4, .port = (__u16)port};
	__u64 cookie = bpf_get_socket_cookie(ctx);

	bpf_map_update_elem(&zt_cookie_dst, &cookie, &dst, BPF_ANY);
}

static __always_inline int to_dns(struct bpf_sock_addr *ctx)
{
	remember(ctx, ctx->user_ip4, ctx->user_port);
	ctx->user_ip4 = bpf_htonl(LOCALHOST);
	ctx->user_port = bpf_htons(DNS_PORT);
	return 1;
}

SEC("cgroup/connect4")
int zt_connect4(struct bpf_sock_addr *ctx)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct pod_info *pod = bpf_map_lookup_elem(&zt_pods, &netns);
	__u32 dst = ctx->user_ip4;
	__u32 port = ctx->user_port;

	if (!pod)
		return 0; /* attached but not configured: refuse, never bypass */
	if (ctx->protocol == IPPROTO_UDP) {
		if ((pod->flags & POD_DNS_CAPTURE) && port == bpf_htons(53))
			return to_dns(ctx);
		return 1;
	}
	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	/* As `-o lo -j ACCEPT`: the pod's own addresses and loopback stay local. */
	if (is_loopback(dst) || dst == pod->ip4 || dst == bpf_htonl(PROBE_SNAT_IP))
		return 1;
	if ((pod->flags & POD_DNS_CAPTURE) && port == bpf_htons(53))
		return to_dns(ctx);
	remember(ctx, dst, port);
	ctx->user_ip4 = pod->ip4;
	ctx->user_port = bpf_htons(OUTBOUND_PORT);
	return 1;
}

SEC("sockops")
int zt_sockops(struct bpf_sock_ops *skops)
{
	struct orig_dst *dst;
	struct tuple4 key = {};
	__u64 cookie;

	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB || skops->family != 2 /* AF_INET */)
		return 1;
	cookie = bpf_get_socket_cookie(skops);
	dst = bpf_map_lookup_elem(&zt_cookie_dst, &cookie);
	if (!dst)
		return 1;
	key.src_ip4 = skops->local_ip4;
	key.dst_ip4 = skops->remote_ip4;
	key.src_port = (__u16)skops->local_port;
	key.dst_port = (__u16)bpf_ntohl(skops->remote_port);
	bpf_map_update_elem(&zt_orig_dst, &key, dst, BPF_ANY);
	bpf_map_delete_elem(&zt_cookie_dst, &cookie);
	return 1;
}

SEC("cgroup/sendmsg4")
int zt_sendmsg4(struct bpf_sock_addr *ctx)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct pod_info *pod = bpf_map_lookup_elem(&zt_pods, &netns);

	if (!pod)
		return 0;
	if ((pod->flags & POD_DNS_CAPTURE) && ctx->user_port == bpf_htons(53))
		return to_dns(ctx);
	return 1;
}

SEC("cgroup/recvmsg4")
int zt_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct orig_dst *dst;
	__u64 cookie;

	if (ctx->user_port != bpf_htons(DNS_PORT) || ctx->user_ip4 != bpf_htonl(LOCALHOST))
		return 1;
	cookie = bpf_get_socket_cookie(ctx);
	dst = bpf_map_lookup_elem(&zt_cookie_dst, &cookie);
	if (dst) {
		ctx->user_ip4 = dst->ip4;
		ctx->user_port = dst->port;
	}
	return 1;
}

/* ztunnel's listener on 15006 in this netns, for the packet's addresses. */
static __always_inline struct bpf_sock *listener(struct __sk_buff *skb, struct bpf_sock_tuple *t)
{
	struct bpf_sock_tuple probe = *t;

	probe.ipv4.dport = bpf_htons(INBOUND_PLAINTEXT_PORT);
	return bpf_skc_lookup_tcp(skb, &probe, sizeof(probe.ipv4), BPF_F_CURRENT_NETNS, 0);
}

SEC("tc")
int zt_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	struct tcphdr *tcp;
	struct iphdr *ip;
	int syn;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl < 5)
		return TC_ACT_OK;
	if (ip->frag_off & bpf_htons(0x1fff))
		return TC_ACT_OK; /* a later fragment: the first one was decided */
	tcp = (void *)ip + ip->ihl * 4;
	if ((void *)(tcp + 1) > end)
		return TC_ACT_OK;
	if (tcp->dest == bpf_htons(HBONE_PORT) || ip->saddr == bpf_htonl(PROBE_SNAT_IP))
		return TC_ACT_OK;
	t.ipv4.saddr = ip->saddr;
	t.ipv4.daddr = ip->daddr;
	t.ipv4.sport = tcp->source;
	t.ipv4.dport = tcp->dest;
	syn = tcp->syn && !tcp->ack;
	if (!syn) {
		/* A connection that exists (ztunnel's, or one it accepted) goes its way;
		 * the app's own listener is not such a connection. */
		sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
		if (sk) {
			int known = sk->state != BPF_TCP_LISTEN;

			bpf_sk_release(sk);
			if (known)
				return TC_ACT_OK;
		}
	}
	sk = listener(skb, &t);
	if (!sk)
		return TC_ACT_SHOT; /* ztunnel is not there: fail closed */
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return TC_ACT_SHOT;
	}
	if (bpf_sk_assign(skb, sk, 0)) {
		bpf_sk_release(sk);
		return TC_ACT_SHOT;
	}
	bpf_sk_release(sk);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
