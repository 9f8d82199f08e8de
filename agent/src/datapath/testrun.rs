//! `BPF_PROG_TEST_RUN` of the datapath's programs on crafted frames, with the mark passed
//! as XDP metadata the way a NIC (or the emulated one) leaves it.

use std::os::fd::{AsRawFd, OwnedFd};

use aya::programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp};

use super::{Datapath, Prog, Result, TcProg, prog_err};

/// `struct xdp_md` as `ctx_in`/`ctx_out`: `data` is the metadata length in front of the
/// frame in `data_in`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// The outcome of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    /// XDP action (`XDP_PASS` = 2, `XDP_TX` = 3, `XDP_DROP` = 1, `XDP_ABORTED` = 0).
    pub action: u32,
    /// The frame as the program left it (metadata stripped).
    pub frame: Vec<u8>,
    /// Average nanoseconds per repetition, as the kernel measured it.
    pub ns_per_run: u64,
}

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

impl Datapath {
    /// Runs `prog` once on `frame`, with `mark` in 4 bytes of metadata when given.
    pub fn test_run(&mut self, prog: Prog, frame: &[u8], mark: Option<u32>) -> Result<RunResult> {
        self.test_run_repeat(prog, frame, mark, 1)
    }

    /// Runs `prog` `repeat` times on the same buffer (the kernel does not restore it
    /// between repetitions: see the benchmark wrapper).
    pub fn test_run_repeat(
        &mut self,
        prog: Prog,
        frame: &[u8],
        mark: Option<u32>,
        repeat: u32,
    ) -> Result<RunResult> {
        let xdp = self.program(prog)?;
        run_xdp(xdp, frame, mark, repeat).map_err(prog_err(prog.name()))
    }
}

/// A loaded XDP program that another thread runs with `BPF_PROG_TEST_RUN` through its own
/// file descriptor, while the [`Datapath`] stays with its owner: the benchmark's flood on
/// one CPU while it measures on another.
pub struct XdpRunner {
    fd: OwnedFd,
}

/// `union bpf_attr` for `BPF_PROG_TEST_RUN` (the `test` member, up to `cpu`).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
}

const BPF_PROG_TEST_RUN: libc::c_int = 10;

impl XdpRunner {
    /// Runs the program `repeat` times on `frame` (no metadata, nothing copied back):
    /// its action and the kernel's average ns a repetition.
    pub fn run(&self, frame: &[u8], repeat: u32) -> std::io::Result<(u32, u32)> {
        let mut attr = TestRunAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat,
            ..Default::default()
        };
        crate::xdp_link::bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        Ok((attr.retval, attr.duration))
    }
}

impl Datapath {
    /// A runner of `prog` for another thread (its own duplicate of the program's fd).
    pub fn xdp_runner(&mut self, prog: Prog) -> Result<XdpRunner> {
        Ok(XdpRunner {
            fd: self.program_fd(prog)?,
        })
    }
}

/// `BPF_PROG_TEST_RUN` of any loaded XDP program, with `mark` as 4 bytes of metadata.
pub fn run_xdp(
    xdp: &Xdp,
    frame: &[u8],
    mark: Option<u32>,
    repeat: u32,
) -> std::result::Result<RunResult, ProgramError> {
    let meta: Vec<u8> = mark.map(|m| m.to_ne_bytes().to_vec()).unwrap_or_default();
    let mut data_in = meta.clone();
    data_in.extend_from_slice(frame);
    let md = XdpMd {
        data: meta.len() as u32,
        data_end: data_in.len() as u32,
        ..Default::default()
    };
    let ctx_in = as_bytes(&md).to_vec();
    let mut ctx_out = vec![0u8; std::mem::size_of::<XdpMd>()];
    let mut data_out = vec![0u8; data_in.len() + 512];
    let res = xdp.test_run(TestRunOptions {
        data_in: Some(&data_in),
        data_out: Some(&mut data_out),
        ctx_in: Some(&ctx_in),
        ctx_out: Some(&mut ctx_out),
        repeat,
        ..TestRunOptions::new()
    })?;
    let out_md: XdpMd = unsafe { std::ptr::read_unaligned(ctx_out.as_ptr().cast()) };
    let size = (res.data_size_out as usize).min(data_out.len());
    let meta_len = (out_md.data as usize).min(size);
    Ok(RunResult {
        action: res.return_value,
        frame: data_out[meta_len..size].to_vec(),
        ns_per_run: res.duration.as_nanos() as u64,
    })
}

fn as_bytes(md: &XdpMd) -> &[u8] {
    unsafe { std::slice::from_raw_parts((md as *const XdpMd).cast(), std::mem::size_of::<XdpMd>()) }
}

/// TC return codes (`TC_ACT_*`) the TC programs use.
pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// The leading fields of `struct __sk_buff` as `ctx_in`/`ctx_out` of a TC test run: the
/// kernel takes `mark` (and a few later fields) from it and refuses non-zero `len` and
/// `pkt_type`; the rest of the struct counts as zero.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct SkBuffHead {
    len: u32,
    pkt_type: u32,
    mark: u32,
}

/// Room for `struct __sk_buff` as any kernel writes it back.
const SK_BUFF_MAX: usize = 512;

/// The outcome of one TC run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcRunResult {
    /// `TC_ACT_*` (`TC_ACT_REDIRECT` for a packet sent out of the interface).
    pub action: i32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// `skb->mark` as the program left it.
    pub mark: u32,
    /// Average nanoseconds per repetition, as the kernel measured it.
    pub ns_per_run: u64,
}

impl Datapath {
    /// Runs the TC program `prog` once on `frame` with `skb->mark = mark`.
    pub fn test_run_tc(&mut self, prog: TcProg, frame: &[u8], mark: u32) -> Result<TcRunResult> {
        let tc = self.tc_program(prog)?;
        run_tc(tc, frame, mark, 1).map_err(prog_err(prog.name()))
    }
}

/// `BPF_PROG_TEST_RUN` of any loaded TC program, with `skb->mark = mark`.
pub fn run_tc(
    tc: &SchedClassifier,
    frame: &[u8],
    mark: u32,
    repeat: u32,
) -> std::result::Result<TcRunResult, ProgramError> {
    let head = SkBuffHead {
        mark,
        ..Default::default()
    };
    // SAFETY: plain old data, read as its bytes.
    let ctx_in = unsafe {
        std::slice::from_raw_parts(
            (&head as *const SkBuffHead).cast::<u8>(),
            std::mem::size_of::<SkBuffHead>(),
        )
    }
    .to_vec();
    // The kernel writes the whole `struct __sk_buff` back (192 bytes on 6.x) and fails with
    // ENOSPC when it does not fit.
    let mut ctx_out = vec![0u8; SK_BUFF_MAX];
    let mut data_out = vec![0u8; frame.len() + 512];
    let res = tc.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut data_out),
        ctx_in: Some(&ctx_in),
        ctx_out: Some(&mut ctx_out),
        repeat,
        ..TestRunOptions::new()
    })?;
    let out: SkBuffHead = unsafe { std::ptr::read_unaligned(ctx_out.as_ptr().cast()) };
    let size = (res.data_size_out as usize).min(data_out.len());
    Ok(TcRunResult {
        action: res.return_value as i32,
        frame: data_out[..size].to_vec(),
        mark: out.mark,
        ns_per_run: res.duration.as_nanos() as u64,
    })
}
