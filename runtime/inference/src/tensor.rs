//! The host's tensor type, shared by the HTTP codecs, tract and the guest boundary.

use outpost_bundle::manifest::DataType;

/// A named tensor with little-endian packed elements (`BYTES`: u32 length + bytes each).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Name.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Packed elements.
    pub data: Vec<u8>,
}

impl Tensor {
    /// Number of elements the shape describes, if it fits in `u64`.
    pub fn element_count(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Checks that `data` holds exactly the elements the shape describes and is within `cap`.
    pub fn check(&self, cap: u64) -> Result<(), String> {
        if self.data.len() as u64 > cap {
            return Err(format!(
                "tensor `{}` is {} bytes, above the limit of {cap}",
                self.name,
                self.data.len()
            ));
        }
        let count = self.element_count().ok_or_else(|| {
            format!(
                "tensor `{}`: shape {:?} is too large",
                self.name, self.shape
            )
        })?;
        match self.datatype.element_size() {
            Some(size) => {
                let want = count
                    .checked_mul(size as u64)
                    .filter(|&b| b <= cap)
                    .ok_or_else(|| {
                        format!(
                            "tensor `{}`: shape {:?} needs more than the limit of {cap} bytes",
                            self.name, self.shape
                        )
                    })?;
                if want != self.data.len() as u64 {
                    return Err(format!(
                        "tensor `{}`: shape {:?} of {} needs {want} bytes, got {}",
                        self.name,
                        self.shape,
                        self.datatype.oip_name(),
                        self.data.len()
                    ));
                }
            }
            None => {
                let mut rest = &self.data[..];
                let mut n = 0u64;
                while !rest.is_empty() {
                    let len = rest
                        .get(..4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                        .filter(|&l| rest.len() >= 4 + l)
                        .ok_or_else(|| format!("tensor `{}`: malformed BYTES data", self.name))?;
                    rest = &rest[4 + len..];
                    n += 1;
                }
                if n != count {
                    return Err(format!(
                        "tensor `{}`: shape {:?} needs {count} elements, got {n}",
                        self.name, self.shape
                    ));
                }
            }
        }
        Ok(())
    }
}
