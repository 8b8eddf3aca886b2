//! Finds the tensor storages that a TorchScript pickle (`data.pkl`, `constants.pkl`) refers to.
//!
//! libtorch's pickler writes each storage as a persistent id
//! `("storage", torch.<Type>Storage, key, location, numel)`; the bytes live in the archive's
//! record `<archive>/<key>`. This is a small pickle machine that tracks only what it needs to
//! read those tuples (strings, integers, globals, tuples, the memo) and treats every other
//! value as opaque. It never executes anything.
//!
//! Why by hand: the Rust pickle crates (serde-pickle and its forks) decode a pickle into serde
//! data and give no way to receive persistent ids, which is all this needs; the readers that do
//! handle PyTorch files come inside whole tensor libraries and read `torch.save` checkpoints,
//! not TorchScript's pickles.
//!
//! The input is untrusted, so its cost is bounded by its length: values are shared, never
//! copied (the memo and DUP hand out the same value again), tuples nest at most [`MAX_DEPTH`]
//! deep, and every size is checked against the bytes that are actually there.

use std::rc::Rc;

use anyhow::{bail, Context, Result};

use crate::layout::DType;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: DType,
    pub numel: u64,
}

/// The deepest nesting of tuples accepted; libtorch's pickles nest a few levels.
pub const MAX_DEPTH: u32 = 1000;

/// A pickle value as far as this reader cares. Cloning is O(1).
#[derive(Clone, Debug)]
enum Value {
    Str(Rc<str>),
    Int(i64),
    Global(Rc<str>, Rc<str>),
    /// The items and the nesting depth (1 for a tuple of non-tuples).
    Tuple(Rc<[Value]>, u32),
    Opaque,
}

impl Value {
    fn str(s: &[u8]) -> Value {
        Value::Str(String::from_utf8_lossy(s).into())
    }

    fn tuple(items: Vec<Value>, at: usize) -> Result<Value> {
        let depth = 1 + items
            .iter()
            .map(|v| match v {
                Value::Tuple(_, d) => *d,
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        if depth > MAX_DEPTH {
            bail!("pickle nests tuples deeper than {MAX_DEPTH} at byte {at}");
        }
        Ok(Value::Tuple(items.into(), depth))
    }
}

fn storage_dtype(module: &str, name: &str) -> Result<DType> {
    if module != "torch" {
        bail!("storage type {module}.{name} is not a torch storage");
    }
    Ok(match name {
        "DoubleStorage" => DType::F64,
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        other => bail!("tensor storage type torch.{other} is not supported"),
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.with_context(|| format!("pickle ends early at byte {}", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<Rc<str>> {
        let rest = &self.bytes[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("unterminated pickle line")?;
        let s = String::from_utf8_lossy(&rest[..n]).into();
        self.pos += n + 1;
        Ok(s)
    }
    /// A length read from the pickle: beyond the bytes left, it cannot be right.
    fn len(&mut self, n: u64) -> Result<usize> {
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len() - self.pos)
            .with_context(|| {
                format!(
                    "pickle ends early at byte {}: {n} more bytes declared",
                    self.pos
                )
            })
    }
    fn string(&mut self, n: u64) -> Result<Value> {
        let n = self.len(n)?;
        Ok(Value::str(self.take(n)?))
    }
}

/// Every storage the pickle refers to, each key once, in order of first appearance.
pub fn storage_refs(pickle: &[u8]) -> Result<Vec<StorageRef>> {
    let mut r = Reader {
        bytes: pickle,
        pos: 0,
    };
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: std::collections::HashMap<u64, Value> = Default::default();
    let mut refs: Vec<StorageRef> = Vec::new();
    let pop = |stack: &mut Vec<Value>| stack.pop().context("pickle stack underflow");
    let pop_mark = |stack: &mut Vec<Value>, marks: &mut Vec<usize>| -> Result<Vec<Value>> {
        let m = marks.pop().context("pickle has no mark to pop to")?;
        if m > stack.len() {
            bail!("pickle mark past the stack");
        }
        Ok(stack.split_off(m))
    };
    loop {
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?;
            } // PROTO
            0x95 => {
                r.u64()?;
            } // FRAME
            b'.' => break, // STOP
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(module, name));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                    _ => stack.push(Value::Opaque),
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                let Value::Tuple(items, _) = &pid else {
                    bail!("persistent id at byte {at} is not a tuple")
                };
                match &items[..] {
                    [Value::Str(kind), Value::Global(module, name), Value::Str(key), Value::Str(_location), Value::Int(numel)]
                        if &**kind == "storage" =>
                    {
                        let dtype = storage_dtype(module, name)?;
                        if *numel < 0 {
                            bail!("storage {key} has a negative size");
                        }
                        let numel = *numel as u64;
                        match refs.iter().find(|s| *s.key == **key) {
                            Some(s) if s.dtype != dtype || s.numel != numel => {
                                bail!(
                                    "storage {key} is declared twice with different types or sizes"
                                )
                            }
                            Some(_) => {}
                            None => refs.push(StorageRef {
                                key: key.to_string(),
                                dtype,
                                numel,
                            }),
                        }
                    }
                    _ => bail!("persistent id at byte {at} is not a tensor storage"),
                }
                stack.push(Value::Opaque);
            }
            b'(' => marks.push(stack.len()),
            b't' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::tuple(items, at)?);
            }
            b')' => stack.push(Value::tuple(vec![], at)?),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    bail!("pickle stack underflow at byte {at}");
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::tuple(items, at)?);
            }
            b'X' => {
                let n = r.u32()?.into();
                stack.push(r.string(n)?);
            }
            0x8c => {
                let n = r.u8()?.into();
                stack.push(r.string(n)?);
            }
            0x8d => {
                let n = r.u64()?;
                stack.push(r.string(n)?);
            }
            b'B' | b'C' | 0x8e => {
                let n = match op {
                    b'B' => r.u32()?.into(),
                    b'C' => r.u8()?.into(),
                    _ => r.u64()?,
                };
                let n = r.len(n)?;
                r.take(n)?;
                stack.push(Value::Opaque);
            }
            b'J' => stack.push(Value::Int(r.u32()? as i32 as i64)),
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => stack.push(Value::Int(r.u16()? as i64)),
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    r.u8()?.into()
                } else {
                    r.u32()?.into()
                };
                let n = r.len(n)?;
                let bytes = r.take(n)?;
                let value = if n <= 8 && n > 0 {
                    let mut buf = if bytes[n - 1] & 0x80 != 0 {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(bytes);
                    Value::Int(i64::from_le_bytes(buf))
                } else if n == 0 {
                    Value::Int(0)
                } else {
                    Value::Opaque
                };
                stack.push(value);
            }
            b'G' => {
                r.take(8)?;
                stack.push(Value::Opaque);
            }
            0x88 | 0x89 | b'N' | b']' | b'}' | 0x8f => stack.push(Value::Opaque),
            b'a' => {
                pop(&mut stack)?;
            }
            b's' => {
                pop(&mut stack)?;
                pop(&mut stack)?;
            }
            b'e' | b'u' | 0x90 => {
                pop_mark(&mut stack, &mut marks)?;
            }
            0x91 => {
                pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::Opaque);
            }
            b'q' | b'r' | 0x94 => {
                let key = match op {
                    b'q' => r.u8()? as u64,
                    b'r' => r.u32()? as u64,
                    _ => memo.len() as u64,
                };
                let top = stack
                    .last()
                    .context("pickle memoizes an empty stack")?
                    .clone();
                memo.insert(key, top);
            }
            b'h' | b'j' => {
                let key = if op == b'h' {
                    r.u8()? as u64
                } else {
                    r.u32()? as u64
                };
                let v = memo
                    .get(&key)
                    .with_context(|| format!("pickle memo {key} is unset"))?;
                stack.push(v.clone());
            }
            b'R' | 0x81 => {
                pop(&mut stack)?;
                pop(&mut stack)?;
                stack.push(Value::Opaque);
            }
            b'b' | b'0' => {
                pop(&mut stack)?;
            }
            b'1' => {
                pop_mark(&mut stack, &mut marks)?;
            }
            b'2' => {
                let top = stack.last().context("pickle stack underflow")?.clone();
                stack.push(top);
            }
            other => bail!("unsupported pickle opcode 0x{other:02x} at byte {at}"),
        }
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[("storage", torch.FloatStorage, "0", "cpu", 6)]` as persistent ids, hand-assembled,
    /// with the second reference coming from the memo.
    #[test]
    fn finds_storages_through_memo_and_dedups() {
        let mut p = vec![0x80, 2, b'(', 0x8c, 7];
        p.extend_from_slice(b"storage");
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        p.extend_from_slice(&[0x8c, 1, b'0', 0x8c, 3]);
        p.extend_from_slice(b"cpu");
        p.extend_from_slice(&[b'K', 6, b't', b'q', 0, b'Q', b'h', 0, b'Q', b'0', b'.']);
        let refs = storage_refs(&p).unwrap();
        assert_eq!(
            refs,
            vec![StorageRef {
                key: "0".into(),
                dtype: DType::F32,
                numel: 6
            }]
        );
    }

    #[test]
    fn truncated_pickle_is_an_error() {
        let err = storage_refs(&[0x80, 2, b'X', 10, 0, 0, 0, b'a']).unwrap_err();
        assert!(err.to_string().contains("ends early"), "{err}");
    }

    /// A pickle whose memo doubles a tuple forty times: 2^40 values if copied, a few hundred
    /// bytes and a few hundred values when shared.
    #[test]
    fn memo_references_are_shared_not_copied() {
        let mut p = vec![0x80, 2, b')', b'q', 0];
        for _ in 0..40 {
            p.extend_from_slice(&[b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        assert_eq!(storage_refs(&p).unwrap(), vec![]);
    }

    /// Each TUPLE1 wraps the value below it: nesting would otherwise only be bounded by the
    /// pickle's length, and dropping it would overflow the stack.
    #[test]
    fn deep_nesting_is_refused() {
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85, 200_000));
        p.push(b'.');
        let err = storage_refs(&p).unwrap_err();
        assert!(err.to_string().contains("deeper than 1000"), "{err}");
    }

    #[test]
    fn declared_lengths_beyond_the_pickle_are_refused() {
        for op in [0x8d, 0x8e] {
            let mut p = vec![0x80, 2, op];
            p.extend_from_slice(&(1u64 << 62).to_le_bytes());
            p.push(b'.');
            let err = storage_refs(&p).unwrap_err();
            assert!(err.to_string().contains("more bytes declared"), "{err}");
        }
    }
}
