//! The kernel's choice of slot for `--via socket`: a classic BPF program attached to
//! each reuseport group (`SO_ATTACH_REUSEPORT_CBPF`, no privilege needed), whose
//! return value is the index of the group's socket, which is the slot.
//!
//! * `sticky`: the program computes `balance::sticky`'s function from the client
//!   address in the network header and returns the slot. It is generated from the set
//!   of slots with a ready worker and attached again only when that set changes: a
//!   slot without a ready worker loses its clients to their next choice until it is
//!   ready again (what it had queued waits for its replacement, which inherits it).
//! * `rr`: while every slot is ready the program returns an index past the group,
//!   which makes the kernel use its own flow hash (a 4-tuple hash: an even spread with
//!   no master involved). While some slot is not ready, the `sticky` program over the
//!   ready slots keeps new connections away from it.
//!
//! The program (`A`, `X` and `M[]` are classic BPF's registers and scratch words):
//! ```text
//!   A = version nibble of the IP header; if 6 fold the IPv6 source's four words into
//!   A, else A = the IPv4 source; M[0] = A
//!   for each ready slot k, lowest first:
//!     A = fmix32(M[0] ^ seed(k)); if k is the first or A > M[1]: M[1] = A, M[2] = k
//!   return M[2]
//! ```
//! `fmix32` takes 11 instructions, a slot 16 to 18: with [`MAX_STEERED_SLOTS`] the
//! program stays inside the kernel's 4,096-instruction limit.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::sticky::seed;
use crate::config::Balance;

/// The most slots `--via socket` can steer (the program's size grows with them).
pub const MAX_STEERED_SLOTS: usize = 200;

// Classic BPF opcodes (linux/bpf_common.h, linux/filter.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const B: u16 = 0x10;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const MEM: u16 = 0x60;
const MUL: u16 = 0x20;
const RSH: u16 = 0x70;
const XOR: u16 = 0xa0;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;
const JGT: u16 = 0x20;
const K: u16 = 0x00;
const X: u16 = 0x08;
const A: u16 = 0x10;
const TAX: u16 = 0x00;
/// Loads relative to the network (IP) header.
const NET: u32 = (-0x10_0000i32) as u32;

/// One classic BPF instruction.
fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// `A = fmix32(A)`, with X as scratch.
fn fmix32(p: &mut Vec<libc::sock_filter>) {
    for (shift, mul) in [(16, Some(0x85eb_ca6b)), (13, Some(0xc2b2_ae35)), (16, None)] {
        p.push(op(MISC | TAX, 0, 0, 0));
        p.push(op(ALU | RSH | K, 0, 0, shift));
        p.push(op(ALU | XOR | X, 0, 0, 0));
        if let Some(m) = mul {
            p.push(op(ALU | MUL | K, 0, 0, m));
        }
    }
}

/// The program that sends each client to its `sticky` slot among `ready` (slot numbers,
/// any order), in a group whose sockets are in slot order; with no slot ready, to the
/// kernel's own choice.
#[cfg(test)]
pub(crate) fn sticky_program(ready: &[usize]) -> Vec<libc::sock_filter> {
    let order: Vec<usize> = (0..=ready.iter().copied().max().unwrap_or(0)).collect();
    mapped_program(ready, &order)
}

/// [`sticky_program`] for a group whose socket at index `i` is slot `order[i]`; ready
/// slots with no socket in the group are left out.
fn mapped_program(ready: &[usize], order: &[usize]) -> Vec<libc::sock_filter> {
    let mut ready: Vec<usize> = ready.iter().copied().filter(|s| order.contains(s)).collect();
    ready.sort_unstable();
    ready.dedup();
    let mut p = Vec::new();
    if ready.is_empty() {
        p.push(op(RET | K, 0, 0, u32::MAX));
        return p;
    }
    // The source address as one word in M[0].
    p.push(op(LD | B | ABS, 0, 0, NET));
    p.push(op(ALU | RSH | K, 0, 0, 4));
    let mut v6 = Vec::new();
    v6.push(op(LD | W | ABS, 0, 0, NET.wrapping_add(8)));
    for i in 1..4u32 {
        fmix32(&mut v6);
        v6.push(op(ST, 0, 0, 1));
        v6.push(op(LD | W | ABS, 0, 0, NET.wrapping_add(8 + 4 * i)));
        v6.push(op(MISC | TAX, 0, 0, 0));
        v6.push(op(LD | W | MEM, 0, 0, 1));
        v6.push(op(ALU | XOR | X, 0, 0, 0));
    }
    v6.push(op(ST, 0, 0, 0));
    // Over the IPv4 load that follows.
    v6.push(op(JMP | JA, 0, 0, 2));
    let skip_v6 = u8::try_from(v6.len()).expect("the IPv6 fold is short");
    p.push(op(JMP | JEQ | K, 0, skip_v6, 6));
    p.extend(v6);
    p.push(op(LD | W | ABS, 0, 0, NET.wrapping_add(12)));
    p.push(op(ST, 0, 0, 0));
    // Rendezvous: the heaviest ready slot, the first (lowest) on a tie.
    for (i, &slot) in ready.iter().enumerate() {
        p.push(op(LD | W | MEM, 0, 0, 0));
        p.push(op(ALU | XOR | K, 0, 0, seed(slot)));
        fmix32(&mut p);
        if i > 0 {
            p.push(op(LDX | W | MEM, 0, 0, 1));
            p.push(op(JMP | JGT | X, 0, 3, 0));
        }
        let index = order.iter().position(|&s| s == slot).expect("filtered above");
        p.push(op(ST, 0, 0, 1));
        p.push(op(LD | W | IMM, 0, 0, index as u32));
        p.push(op(ST, 0, 0, 2));
    }
    p.push(op(LD | W | MEM, 0, 0, 2));
    p.push(op(RET | A, 0, 0, 0));
    p
}

/// The program for `mode` given which slots are ready (`ready[k]`), for a group whose
/// socket at index `i` is slot `order[i]`.
pub(crate) fn program(mode: Balance, ready: &[bool], order: &[usize]) -> Vec<libc::sock_filter> {
    let slots: Vec<usize> = (0..ready.len()).filter(|&k| ready[k]).collect();
    if mode == Balance::RoundRobin && slots.len() == ready.len() && order.len() == ready.len() {
        // Past the group: the kernel's own flow hash.
        return vec![op(RET | K, 0, 0, u32::MAX)];
    }
    mapped_program(&slots, order)
}

/// Sets `program` as the selector of the whole reuseport group `member` belongs to,
/// replacing the one before atomically while connections flow.
pub(crate) fn attach(member: BorrowedFd<'_>, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `program.len()` initialised instructions that outlive
    // the call; the kernel copies the program and keeps no pointer to our memory.
    let rc = unsafe {
        libc::setsockopt(
            member.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Which slots are ready, and where each slot's socket is in each group: the kernel
/// indexes a group's sockets in the order they joined it, and a socket that stops
/// listening (a worker's `shutdown()` reaches the master's copy too) leaves it, the
/// last socket taking its place; listening again puts it at the end.
pub(crate) struct Steering {
    mode: Balance,
    ready: Vec<bool>,
    /// For each group (listen address), the slot of the socket at each index.
    groups: Vec<Vec<usize>>,
    /// How many times programs were attached (once per change of the ready set or of
    /// a group).
    attached: u64,
}

impl Steering {
    /// Steering for `slots` slots over `groups` groups in slot order, none ready yet
    /// (the kernel's own choice meanwhile).
    pub fn new(mode: Balance, slots: usize, groups: usize) -> Steering {
        Steering {
            mode,
            ready: vec![false; slots],
            groups: vec![(0..slots).collect(); groups],
            attached: 0,
        }
    }

    /// Marks `slot` ready or not; true when that changed the ready set.
    pub fn set_ready(&mut self, slot: usize, ready: bool) -> bool {
        match self.ready.get_mut(slot) {
            Some(was) if *was != ready => {
                *was = ready;
                true
            }
            _ => false,
        }
    }

    /// `slot`'s socket left `group` (it was found not listening).
    pub fn left(&mut self, group: usize, slot: usize) {
        if let Some(order) = self.groups.get_mut(group) {
            if let Some(i) = order.iter().position(|&s| s == slot) {
                order.swap_remove(i);
            }
        }
    }

    /// `slot`'s socket joined `group` again (listening again), at its end.
    pub fn joined(&mut self, group: usize, slot: usize) {
        if let Some(order) = self.groups.get_mut(group) {
            if !order.contains(&slot) {
                order.push(slot);
            }
        }
    }

    /// The program of each group, with the number of this attachment.
    pub fn programs(&mut self) -> (Vec<Vec<libc::sock_filter>>, u64) {
        self.attached += 1;
        let programs = self.groups.iter().map(|order| program(self.mode, &self.ready, order)).collect();
        (programs, self.attached)
    }

    /// The ready slots, for the log.
    pub fn ready_slots(&self) -> Vec<usize> {
        (0..self.ready.len()).filter(|&k| self.ready[k]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::via::socket::bind_group;
    use socket2::{Domain, Socket, Type};
    use std::io::{Read, Write};
    use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
    use std::os::fd::{AsFd, AsRawFd};

    /// Connects from `source` to `addr`; returns the index of the group member that got it.
    fn which(group: &[TcpListener], source: IpAddr, addr: SocketAddr) -> usize {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(source, 0).into()).unwrap();
        s.connect(&addr.into()).unwrap();
        let mut client: TcpStream = s.into();
        client.write_all(b"x").unwrap();
        for l in group {
            l.set_nonblocking(true).unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            for (i, l) in group.iter().enumerate() {
                if let Ok((mut c, peer)) = l.accept() {
                    assert_eq!(peer.ip(), source);
                    let mut b = [0u8; 1];
                    c.set_nonblocking(false).unwrap();
                    c.read_exact(&mut b).unwrap();
                    return i;
                }
            }
            assert!(std::time::Instant::now() < deadline, "no member accepted a connection");
            std::thread::yield_now();
        }
    }

    #[test]
    fn the_program_agrees_with_the_rust_function_for_v4() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 4, 64).unwrap();
        let addr = group[0].local_addr().unwrap();
        for ready in [vec![0, 1, 2, 3], vec![0, 1, 3], vec![2]] {
            attach(group[0].as_fd(), &sticky_program(&ready)).unwrap();
            for i in 0..40u8 {
                let source = IpAddr::from([127, 0, 1 + i / 20, 2 + i]);
                let want = crate::balance::slot_for(source, ready.iter().copied()).unwrap();
                assert_eq!(which(&group, source, addr), want, "{source} over {ready:?}");
            }
        }
    }

    #[test]
    fn the_program_agrees_with_the_rust_function_for_v6() {
        let Ok(group) = bind_group("[::1]:0".parse().unwrap(), 3, 64) else {
            assert!(std::env::var_os("CI").is_none(), "IPv6 loopback is needed under CI");
            return;
        };
        let addr = group[0].local_addr().unwrap();
        for ready in [vec![0, 1, 2], vec![1, 2]] {
            attach(group[0].as_fd(), &sticky_program(&ready)).unwrap();
            let source: IpAddr = "::1".parse().unwrap();
            let want = crate::balance::slot_for(source, ready.iter().copied()).unwrap();
            assert_eq!(which(&group, source, addr), want, "::1 over {ready:?}");
        }
    }

    #[test]
    fn a_socket_shut_down_and_listening_again_is_steered_at_its_new_index() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 4, 64).unwrap();
        let addr = group[0].local_addr().unwrap();
        let mut s = Steering::new(Balance::Sticky, 4, 1);
        for slot in 0..4 {
            s.set_ready(slot, true);
        }
        // Slot 1's worker shuts the socket down: it leaves the group (slot 3's socket
        // takes index 1), then listens again at the end.
        // SAFETY: shutdown(2) on a socket of this test's own.
        assert_eq!(unsafe { libc::shutdown(group[1].as_raw_fd(), libc::SHUT_RDWR) }, 0);
        assert!(!crate::via::socket::is_listening(group[1].as_fd()));
        s.left(0, 1);
        crate::via::socket::listen_again(group[1].as_fd(), 64).unwrap();
        s.joined(0, 1);
        let (programs, _) = s.programs();
        attach(group[0].as_fd(), &programs[0]).unwrap();
        for i in 0..60u8 {
            let source = IpAddr::from([127, 0, 2, 2 + i]);
            let want = crate::balance::slot_for(source, 0..4).unwrap();
            assert_eq!(which(&group, source, addr), want, "{source}");
        }
    }

    #[test]
    fn programs_fit_the_kernel_limit_and_change_only_with_the_ready_set() {
        assert!(sticky_program(&(0..MAX_STEERED_SLOTS).collect::<Vec<_>>()).len() <= 4096);
        let mut s = Steering::new(Balance::Sticky, 3, 1);
        assert!(s.set_ready(0, true));
        assert!(!s.set_ready(0, true), "no change, no program");
        assert!(!s.set_ready(9, true));
        assert!(s.set_ready(1, true));
        assert_eq!(s.ready_slots(), [0, 1]);
        assert_eq!(s.programs().1, 1);
        let mut rr = Steering::new(Balance::RoundRobin, 2, 1);
        rr.set_ready(0, true);
        rr.set_ready(1, true);
        assert_eq!(rr.programs().0[0].len(), 1, "every slot ready: the kernel's own hash");
        rr.left(0, 0);
        assert!(rr.programs().0[0].len() > 1, "a slot's socket left: the program steers");
    }

    /// Runs a program as the kernel would on a packet whose network header is `ip`.
    fn run(program: &[libc::sock_filter], ip: &[u8]) -> u32 {
        let (mut a, mut x, mut m) = (0u32, 0u32, [0u32; 16]);
        let load = |k: u32, len: usize| -> u32 {
            let at = k.wrapping_sub(NET) as usize;
            ip[at..at + len].iter().fold(0, |v, &b| (v << 8) | u32::from(b))
        };
        let mut pc = 0;
        loop {
            let i = program[pc];
            pc += 1;
            let operand = if i.code & X != 0 { x } else { i.k };
            match i.code {
                c if c == LD | B | ABS => a = load(i.k, 1),
                c if c == LD | W | ABS => a = load(i.k, 4),
                c if c == LD | W | MEM => a = m[i.k as usize],
                c if c == LD | W | IMM => a = i.k,
                c if c == LDX | W | MEM => x = m[i.k as usize],
                c if c == ST => m[i.k as usize] = a,
                c if c == MISC | TAX => x = a,
                c if c & !X == ALU | RSH => a >>= operand,
                c if c & !X == ALU | XOR => a ^= operand,
                c if c & !X == ALU | MUL => a = a.wrapping_mul(operand),
                c if c == JMP | JA => pc += i.k as usize,
                c if c & !X == JMP | JEQ || c & !X == JMP | JGT => {
                    let yes = if c & !X == JMP | JEQ { a == operand } else { a > operand };
                    pc += usize::from(if yes { i.jt } else { i.jf });
                }
                c if c == RET | K => return i.k,
                c if c == RET | A => return a,
                c => panic!("instruction {c:#x} not expected"),
            }
        }
    }

    fn v4_header(ip: std::net::Ipv4Addr) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0] = 0x45;
        h[12..16].copy_from_slice(&ip.octets());
        h
    }

    fn v6_header(ip: std::net::Ipv6Addr) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[8..24].copy_from_slice(&ip.octets());
        h
    }

    #[test]
    fn the_program_computes_the_rust_function_for_many_v4_and_v6_addresses() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for ready in [vec![0, 1, 2, 3], vec![1, 3], vec![0, 2, 5, 6, 7], (0..64).collect()] {
            let program = sticky_program(&ready);
            for _ in 0..2000 {
                let v4 = std::net::Ipv4Addr::from(next() as u32);
                let want = crate::balance::slot_for(v4.into(), ready.iter().copied()).unwrap();
                assert_eq!(run(&program, &v4_header(v4)), want as u32, "{v4} over {ready:?}");
                let v6 = std::net::Ipv6Addr::from(u128::from(next()) << 64 | u128::from(next()));
                let want = crate::balance::slot_for(v6.into(), ready.iter().copied()).unwrap();
                assert_eq!(run(&program, &v6_header(v6)), want as u32, "{v6} over {ready:?}");
            }
        }
        assert_eq!(run(&sticky_program(&[]), &v4_header([1, 2, 3, 4].into())), u32::MAX);
    }
}
