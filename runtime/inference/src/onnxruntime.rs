//! The onnxruntime backend (feature `onnxruntime`): `libonnxruntime.so` is loaded at run time
//! from a path the device is given, through the `ort` crate's `load-dynamic` mode; nothing is
//! downloaded or linked at build time, so a build with this feature is still one Rust binary
//! that runs without the library (on tract).
//!
//! One library per process: the first one loaded serves every model; asking for another path
//! later is an error naming the one in use.

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, TensorElementType, ValueType};
use outpost_bundle::manifest::{DataType, Dim, TensorSpec};

use crate::{Backend, LoadError, Model, Port, RunError, Tensor, match_inputs};

/// How models run on onnxruntime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrtOptions {
    /// Threads one run of a model may use (onnxruntime's intra-op threads). One by default:
    /// the device runs several requests at once and each takes a core.
    pub threads: usize,
    /// Sessions kept per model, each running one request at a time; made on demand up to
    /// this many. Each holds its own copy of the model's weights.
    pub sessions: usize,
}

impl Default for OrtOptions {
    fn default() -> Self {
        Self {
            threads: 1,
            sessions: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        }
    }
}

/// The onnxruntime backend, over the library it was loaded from.
#[derive(Debug, Clone)]
pub struct Onnxruntime {
    library: Arc<Library>,
    options: OrtOptions,
}

#[derive(Debug)]
struct Library {
    path: PathBuf,
    version: String,
    env: ort::environment::Environment,
}

/// The library this process loaded, or why it could not.
static LOADED: OnceLock<Mutex<Option<Arc<Library>>>> = OnceLock::new();

/// The oldest onnxruntime this build's API needs (`1.MINOR`).
pub const MIN_MINOR_VERSION: u32 = ort::MINOR_VERSION;

impl Onnxruntime {
    /// Loads `libonnxruntime` from `path` (once per process) and checks it: an ELF shared
    /// library for this machine's architecture, exporting onnxruntime's API, at least version
    /// 1.[`MIN_MINOR_VERSION`]. Every refusal names the path and what was found.
    pub fn load(path: &Path, options: OrtOptions) -> Result<Self, LoadError> {
        if options.threads == 0 || options.sessions == 0 {
            return Err(LoadError(
                "onnxruntime threads and sessions must be at least 1".into(),
            ));
        }
        let slot = LOADED.get_or_init(|| Mutex::new(None));
        let mut loaded = slot
            .lock()
            .map_err(|_| LoadError("the onnxruntime loader is poisoned".into()))?;
        if let Some(library) = loaded.as_ref() {
            if library.path != path {
                return Err(LoadError(format!(
                    "onnxruntime is already loaded from `{}` in this process; it cannot also \
                     load `{}`",
                    library.path.display(),
                    path.display()
                )));
            }
            return Ok(Self {
                library: Arc::clone(library),
                options,
            });
        }
        let refuse = |why: String| LoadError(format!("onnxruntime `{}`: {why}", path.display()));
        check_elf(path).map_err(refuse)?;
        let version = library_version(path).map_err(refuse)?;
        let minor = version
            .split('.')
            .nth(1)
            .and_then(|m| m.parse::<u32>().ok())
            .unwrap_or(0);
        if !version.starts_with("1.") || minor < MIN_MINOR_VERSION {
            return Err(refuse(format!(
                "version {version} found; this build needs 1.{MIN_MINOR_VERSION} or later"
            )));
        }
        let env = ort::init_from(path)
            .map_err(|e| refuse(e.to_string()))?
            .with_name("outpost")
            .with_telemetry(false)
            .build()
            .map_err(|e| refuse(e.to_string()))?;
        let library = Arc::new(Library {
            path: path.to_owned(),
            version,
            env,
        });
        *loaded = Some(Arc::clone(&library));
        Ok(Self { library, options })
    }

    /// The library's path.
    pub fn path(&self) -> &Path {
        &self.library.path
    }

    /// The library's version (`1.32.0`).
    pub fn version(&self) -> &str {
        &self.library.version
    }

    /// The options models load with.
    pub fn options(&self) -> OrtOptions {
        self.options
    }

    fn session(&self, bytes: &[u8], overrides: &[(String, i64)]) -> Result<Session, String> {
        let e = |e: ort::Error| e.to_string();
        let mut builder = Session::builder(&self.library.env)
            .map_err(e)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| e.to_string())?
            .with_intra_threads(self.options.threads)
            .map_err(|e| e.to_string())?
            .with_inter_threads(1)
            .map_err(|e| e.to_string())?;
        for (name, size) in overrides {
            builder = builder
                .with_dimension_override(name, *size)
                .map_err(|e| e.to_string())?;
        }
        builder.commit_from_memory(bytes).map_err(e)
    }
}

/// Refuses a file that is not an ELF shared object for this machine, before `dlopen` runs
/// any of it: the error then says which architecture it is for.
fn check_elf(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut head = [0u8; 20];
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    file.read_exact(&mut head)
        .map_err(|_| "not a shared library (too short for an ELF header)".to_string())?;
    if &head[..4] != b"\x7fELF" {
        return Err("not a shared library (no ELF header)".into());
    }
    let machine = u16::from_le_bytes([head[18], head[19]]);
    let name = |m: u16| match m {
        3 => "x86",
        40 => "arm",
        62 => "x86_64",
        183 => "aarch64",
        243 => "riscv",
        _ => "another architecture",
    };
    let ours: u16 = match std::env::consts::ARCH {
        "x86" => 3,
        "arm" => 40,
        "x86_64" => 62,
        "aarch64" => 183,
        "riscv64" => 243,
        _ => return Ok(()),
    };
    if machine != ours {
        return Err(format!(
            "built for {} (ELF machine {machine}), this device is {}",
            name(machine),
            std::env::consts::ARCH
        ));
    }
    Ok(())
}

/// The version string the library reports, read before `ort` uses it.
#[allow(unsafe_code)]
fn library_version(path: &Path) -> Result<String, String> {
    // SAFETY: loading a library runs its initialisers. The path is the onnxruntime the device
    // was configured to use, already checked to be an ELF object for this machine.
    let library = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
    let version = {
        // SAFETY: `OrtGetApiBase` has this signature in every onnxruntime release.
        let get: libloading::Symbol<'_, unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            unsafe { library.get(b"OrtGetApiBase") }.map_err(|_| {
                "not an onnxruntime library (it exports no `OrtGetApiBase`)".to_string()
            })?;
        // SAFETY: the function takes nothing and returns a pointer to a static table or null.
        let base = unsafe { get() };
        if base.is_null() {
            return Err("`OrtGetApiBase` returned nothing".into());
        }
        // SAFETY: `base` points at the library's static API table; `GetVersionString` returns
        // a static NUL-terminated string.
        let text = unsafe { CStr::from_ptr(((*base).GetVersionString)()) };
        text.to_str()
            .map_err(|_| "its version string is not UTF-8".to_string())?
            .to_owned()
    };
    // The library stays loaded for the process (`ort` loads it again by the same path); a
    // C++ runtime unloaded and reloaded is not worth the risk.
    std::mem::forget(library);
    Ok(version)
}

impl Backend for Onnxruntime {
    fn name(&self) -> &'static str {
        "onnxruntime"
    }

    fn load(&self, bytes: &[u8], declared: &[TensorSpec]) -> Result<Arc<dyn Model>, LoadError> {
        OrtModel::load(self, bytes, declared)
            .map(|m| Arc::new(m) as Arc<dyn Model>)
            .map_err(LoadError)
    }
}

/// A model on onnxruntime: a few sessions of one graph, each running one request at a time.
struct OrtModel {
    backend: Onnxruntime,
    /// The graph, kept to make further sessions on demand (only when more than one is allowed).
    bytes: Option<Vec<u8>>,
    overrides: Vec<(String, i64)>,
    pool: Mutex<Pool>,
    freed: Condvar,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
}

struct Pool {
    idle: Vec<Session>,
    made: usize,
}

impl std::fmt::Debug for OrtModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtModel")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

fn datatype_of(t: TensorElementType) -> Option<DataType> {
    Some(match t {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::U8,
        TensorElementType::Uint16 => DataType::U16,
        TensorElementType::Uint32 => DataType::U32,
        TensorElementType::Uint64 => DataType::U64,
        TensorElementType::Int8 => DataType::I8,
        TensorElementType::Int16 => DataType::I16,
        TensorElementType::Int32 => DataType::I32,
        TensorElementType::Int64 => DataType::I64,
        TensorElementType::Float16 => DataType::F16,
        TensorElementType::Float32 => DataType::F32,
        TensorElementType::Float64 => DataType::F64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

/// A graph input or output as a [`Port`], with the names of its symbolic dimensions.
fn port_of(name: &str, ty: &ValueType) -> Result<(Port, Vec<String>), String> {
    let ValueType::Tensor {
        ty,
        shape,
        dimension_symbols,
    } = ty
    else {
        return Err(format!("`{name}` is not a tensor ({ty})"));
    };
    let datatype = datatype_of(*ty).ok_or_else(|| format!("`{name}` has unsupported type {ty}"))?;
    let dims = shape
        .iter()
        .map(|&d| u64::try_from(d).ok())
        .collect::<Vec<_>>();
    let symbols = (0..dims.len())
        .map(|i| dimension_symbols.get(i).cloned().unwrap_or_default())
        .collect();
    Ok((
        Port {
            name: name.to_owned(),
            datatype,
            shape: dims,
        },
        symbols,
    ))
}

impl OrtModel {
    fn load(backend: &Onnxruntime, bytes: &[u8], declared: &[TensorSpec]) -> Result<Self, String> {
        let probe = backend.session(bytes, &[])?;
        let mut inputs = Vec::new();
        let mut overrides = Vec::new();
        for (i, outlet) in probe.inputs().iter().enumerate() {
            let (mut port, symbols) = port_of(outlet.name(), outlet.dtype())?;
            // A dimension the declaration fixes is fixed for the session too (onnxruntime
            // then plans for that size); the other inputs' ports say what the graph says.
            if let Some(d) = declared
                .get(i)
                .filter(|d| d.shape.len() == port.shape.len())
            {
                for (j, dim) in d.shape.iter().enumerate() {
                    if let (Dim::Fixed(n), None) = (dim, port.shape[j]) {
                        port.shape[j] = Some(*n);
                        if !symbols[j].is_empty() {
                            overrides.push((symbols[j].clone(), *n as i64));
                        }
                    }
                }
            }
            inputs.push(port);
        }
        let outputs = probe
            .outputs()
            .iter()
            .map(|o| port_of(o.name(), o.dtype()).map(|(p, _)| p))
            .collect::<Result<Vec<_>, _>>()?;
        overrides.sort();
        overrides.dedup_by(|a, b| a.0 == b.0);
        let first = if overrides.is_empty() {
            probe
        } else {
            drop(probe);
            backend.session(bytes, &overrides)?
        };
        Ok(Self {
            backend: backend.clone(),
            bytes: (backend.options.sessions > 1).then(|| bytes.to_vec()),
            overrides,
            pool: Mutex::new(Pool {
                idle: vec![first],
                made: 1,
            }),
            freed: Condvar::new(),
            inputs,
            outputs,
        })
    }

    /// An idle session, a new one when all are busy and the cap allows, else the next freed.
    fn take(&self) -> Result<Session, RunError> {
        let poisoned = || RunError::Fault("the onnxruntime session pool is poisoned".into());
        let mut pool = self.pool.lock().map_err(|_| poisoned())?;
        loop {
            if let Some(s) = pool.idle.pop() {
                return Ok(s);
            }
            if let Some(bytes) = self
                .bytes
                .as_ref()
                .filter(|_| pool.made < self.backend.options.sessions)
            {
                pool.made += 1;
                drop(pool);
                let made = self.backend.session(bytes, &self.overrides);
                if made.is_err() {
                    self.pool.lock().map_err(|_| poisoned())?.made -= 1;
                }
                return made.map_err(RunError::Fault);
            }
            pool = self.freed.wait(pool).map_err(|_| poisoned())?;
        }
    }

    fn give_back(&self, session: Session) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.idle.push(session);
        }
        self.freed.notify_one();
    }
}

macro_rules! le_vec {
    ($data:expr, $t:ty) => {
        $data
            .chunks_exact(std::mem::size_of::<$t>())
            .map(|c| {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(c);
                <$t>::from_le_bytes(a)
            })
            .collect::<Vec<$t>>()
    };
}

/// A checked tensor as an onnxruntime value (one copy of its elements).
fn to_ort(t: &Tensor) -> Result<DynValue, String> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let e = |e: ort::Error| format!("input `{}`: {e}", t.name);
    macro_rules! tensor {
        ($t:ty) => {
            ort::value::Tensor::from_array((shape, le_vec!(t.data, $t)))
                .map(|v| v.into_dyn())
                .map_err(e)
        };
    }
    match t.datatype {
        DataType::Bool => ort::value::Tensor::from_array((
            shape,
            t.data.iter().map(|&b| b != 0).collect::<Vec<bool>>(),
        ))
        .map(|v| v.into_dyn())
        .map_err(e),
        DataType::U8 => ort::value::Tensor::from_array((shape, t.data.clone()))
            .map(|v| v.into_dyn())
            .map_err(e),
        DataType::I8 => tensor!(i8),
        DataType::U16 => tensor!(u16),
        DataType::I16 => tensor!(i16),
        DataType::U32 => tensor!(u32),
        DataType::I32 => tensor!(i32),
        DataType::U64 => tensor!(u64),
        DataType::I64 => tensor!(i64),
        DataType::F32 => tensor!(f32),
        DataType::F64 => tensor!(f64),
        DataType::F16 => {
            let bits = le_vec!(t.data, u16);
            let halves: Vec<half::f16> = bits.into_iter().map(half::f16::from_bits).collect();
            ort::value::Tensor::from_array((shape, halves))
                .map(|v| v.into_dyn())
                .map_err(e)
        }
        DataType::Bytes => {
            let mut strings = Vec::new();
            let mut rest = &t.data[..];
            while rest.len() >= 4 {
                let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let item = rest.get(4..4 + len).ok_or("malformed BYTES data")?;
                strings.push(
                    String::from_utf8(item.to_vec())
                        .map_err(|_| format!("input `{}`: an element is not UTF-8", t.name))?,
                );
                rest = &rest[4 + len..];
            }
            ort::value::Tensor::from_string_array((shape, &strings[..]))
                .map(|v| v.into_dyn())
                .map_err(e)
        }
    }
}

/// An onnxruntime output as a tensor of packed little-endian elements.
fn from_ort(name: &str, value: &DynValue) -> Result<Tensor, String> {
    let e = |e: ort::Error| format!("output `{name}`: {e}");
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(format!(
            "output `{name}` is not a tensor ({})",
            value.dtype()
        ));
    };
    let datatype =
        datatype_of(*ty).ok_or_else(|| format!("output `{name}` has unsupported type {ty}"))?;
    macro_rules! bytes {
        ($t:ty) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(e)?;
            (
                shape.to_vec(),
                data.iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
        }};
    }
    let (shape, data) = match datatype {
        DataType::Bool => {
            let (shape, data) = value.try_extract_tensor::<bool>().map_err(e)?;
            (shape.to_vec(), data.iter().map(|&b| u8::from(b)).collect())
        }
        DataType::U8 => bytes!(u8),
        DataType::I8 => bytes!(i8),
        DataType::U16 => bytes!(u16),
        DataType::I16 => bytes!(i16),
        DataType::U32 => bytes!(u32),
        DataType::I32 => bytes!(i32),
        DataType::U64 => bytes!(u64),
        DataType::I64 => bytes!(i64),
        DataType::F32 => bytes!(f32),
        DataType::F64 => bytes!(f64),
        DataType::F16 => bytes!(half::f16),
        DataType::Bytes => {
            let (shape, strings) = value.try_extract_strings().map_err(e)?;
            let mut data = Vec::new();
            for s in strings {
                data.extend_from_slice(&(s.len() as u32).to_le_bytes());
                data.extend_from_slice(s.as_bytes());
            }
            (shape.to_vec(), data)
        }
    };
    Ok(Tensor {
        name: name.to_owned(),
        datatype,
        shape: shape.into_iter().map(|d| d.max(0) as u64).collect(),
        data,
    })
}

impl Model for OrtModel {
    fn inputs(&self) -> &[Port] {
        &self.inputs
    }

    fn outputs(&self) -> &[Port] {
        &self.outputs
    }

    fn backend(&self) -> &'static str {
        "onnxruntime"
    }

    fn run(&self, inputs: Vec<Tensor>, cap: u64) -> Result<Vec<Tensor>, RunError> {
        let inputs = match_inputs(&self.inputs, inputs, cap)?;
        let mut values = Vec::with_capacity(inputs.len());
        for (port, t) in self.inputs.iter().zip(&inputs) {
            values.push((port.name.as_str(), to_ort(t).map_err(RunError::Input)?));
        }
        drop(inputs);
        let fault = RunError::Fault;
        let mut session = self.take()?;
        let result = (|| {
            let mut outputs = session.run(values).map_err(|e| fault(e.to_string()))?;
            let mut result = Vec::with_capacity(self.outputs.len());
            for port in &self.outputs {
                let value = outputs.remove(&port.name).ok_or_else(|| {
                    fault(format!("onnxruntime returned no output `{}`", port.name))
                })?;
                let t = from_ort(&port.name, &value).map_err(fault)?;
                result.push(crate::check_output(t, cap)?);
            }
            Ok(result)
        })();
        self.give_back(session);
        result
    }
}
