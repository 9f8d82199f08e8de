//! `BPF_PROG_TEST_RUN` of the datapath's programs on crafted frames, with the mark passed
//! as XDP metadata the way a NIC (or the emulated one) leaves it.

use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp};

use super::{Datapath, Prog, Result, prog_err};

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
