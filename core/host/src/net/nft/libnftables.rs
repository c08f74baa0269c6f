//! nftables in this process: libnftables, the library the `nft` CLI is a
//! thin front end of, opened at run time (`dlopen`), so a change costs a
//! fraction of a millisecond instead of an `nft` process (2-5 ms of exec,
//! dynamic linking and the library's start, per create: issue 12). The
//! same command text, the same parser, one transaction per call, the same
//! output (`-j` is [`NFT_CTX_OUTPUT_JSON`]), the same error text. No
//! build-time dependency: a host without the library gets `None` and the
//! caller runs the `nft` process instead.
//!
//! Each call makes a context of its own (a quarter of a millisecond): its
//! netlink socket then belongs to the calling thread's network namespace,
//! as an `nft` process forked from that thread would, and no state is kept
//! between calls. One call at a time in the process: the library's
//! one-time global setup is not thread-safe.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::{Mutex, OnceLock};

/// The soname of libnftables since 0.9.1, when `nft_run_cmd_from_buffer`
/// took its current signature.
const SONAME: &CStr = c"libnftables.so.1";

/// `NFT_CTX_OUTPUT_JSON` of `<nftables/libnftables.h>`.
const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type SetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// The library's entry points this module calls. The library is never
/// closed, so they stay valid for the process's life.
struct Lib {
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxInt,
    buffer_error: CtxInt,
    output_buffer: CtxBuffer,
    error_buffer: CtxBuffer,
    set_output_flags: SetFlags,
    run_cmd_from_buffer: RunCmd,
}

static LIB: OnceLock<Option<Lib>> = OnceLock::new();

/// One call at a time (see the module docs).
static CALL: Mutex<()> = Mutex::new(());

fn load() -> Option<Lib> {
    // SAFETY: a NUL-terminated constant name; RTLD_LOCAL keeps the
    // library's symbols out of everyone else's lookups.
    let handle = unsafe { libc::dlopen(SONAME.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return None;
    }
    // Each symbol as the function type of its field. SAFETY (of the
    // transmute in each use): the symbol is the libnftables function of
    // that name, whose C prototype (libnftables.h, soname 1) the field's
    // type spells out, and a pointer to a function of this library is a
    // valid function pointer on every platform glibc runs on.
    macro_rules! sym {
        ($name:literal, $ty:ty) => {{
            // SAFETY: `handle` is a live handle from dlopen (never closed);
            // the name is NUL-terminated.
            let p = unsafe { libc::dlsym(handle, $name.as_ptr()) };
            if p.is_null() {
                return None;
            }
            // SAFETY: see above.
            unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
        }};
    }
    Some(Lib {
        ctx_new: sym!(c"nft_ctx_new", CtxNew),
        ctx_free: sym!(c"nft_ctx_free", CtxFree),
        buffer_output: sym!(c"nft_ctx_buffer_output", CtxInt),
        buffer_error: sym!(c"nft_ctx_buffer_error", CtxInt),
        output_buffer: sym!(c"nft_ctx_get_output_buffer", CtxBuffer),
        error_buffer: sym!(c"nft_ctx_get_error_buffer", CtxBuffer),
        set_output_flags: sym!(c"nft_ctx_output_set_flags", SetFlags),
        run_cmd_from_buffer: sym!(c"nft_run_cmd_from_buffer", RunCmd),
    })
}

/// Whether this process runs nftables through the library.
#[cfg(test)]
pub(super) fn available() -> bool {
    LIB.get_or_init(load).is_some()
}

/// Runs `commands` (nft's script syntax, one transaction) in the calling
/// thread's network namespace, printing JSON with `json`: the output, or
/// the library's error text. `None` when the library is not there.
pub(super) fn run(commands: &str, json: bool) -> Option<Result<String, String>> {
    let lib = LIB.get_or_init(load).as_ref()?;
    let Ok(text) = CString::new(commands) else {
        return Some(Err("the commands hold a NUL byte".to_string()));
    };
    // The library exits the process when it cannot open its netlink
    // socket (nft_ctx_new's netlink_init_error): try one first, so a
    // missing nf_tables or no free descriptor is an error here instead.
    if let Err(e) = probe_netlink() {
        return Some(Err(format!(
            "Unable to initialize Netlink socket: {e} (is nf_tables available?)"
        )));
    }
    let _one = CALL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: `ctx` comes from nft_ctx_new, is checked for NULL, used only
    // on this thread while `_one` is held and freed exactly once, after the
    // last read of its buffers (which it owns; they are copied first).
    unsafe {
        let ctx = (lib.ctx_new)(0);
        if ctx.is_null() {
            return Some(Err("nft_ctx_new failed".to_string()));
        }
        let result = if (lib.buffer_output)(ctx) != 0 || (lib.buffer_error)(ctx) != 0 {
            Err("cannot buffer nftables output".to_string())
        } else {
            if json {
                (lib.set_output_flags)(ctx, NFT_CTX_OUTPUT_JSON);
            }
            let rc = (lib.run_cmd_from_buffer)(ctx, text.as_ptr());
            if rc == 0 {
                Ok(owned((lib.output_buffer)(ctx)))
            } else {
                Err(owned((lib.error_buffer)(ctx)))
            }
        };
        (lib.ctx_free)(ctx);
        Some(result)
    }
}

/// Opens and closes a netfilter netlink socket, as nft_ctx_new will.
fn probe_netlink() -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned
    // (and closed) by the OwnedFd at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    Ok(())
}

/// A copy of a buffer the context owns (NULL is empty).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that lives through the call.
unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}
