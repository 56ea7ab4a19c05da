// etcd's KV Range call in its protobuf bytes: a request encoded by hand, a response read without an object per key.
//
//   RangeRequest  { bytes key = 1; bytes range_end = 2; int64 limit = 3; int64 revision = 4; }
//   RangeResponse { ResponseHeader header = 1; repeated KeyValue kvs = 2; bool more = 3; int64 count = 4; }
//   ResponseHeader { …; int64 revision = 3; … }      KeyValue { bytes key = 1; …; bytes value = 5; … }

const VARINT = 0;
const I64 = 1;
const LEN = 2;
const I32 = 5;

function pushVarint(out: number[], n: number): void {
  for (; n >= 0x80; n = Math.floor(n / 128)) out.push((n % 128) | 0x80);
  out.push(n);
}

/** The bytes of a RangeRequest (revision 0: the current one). */
export function encodeRangeRequest(key: Buffer, rangeEnd: Buffer, limit: number, revision: number): Buffer {
  const head: number[] = [];
  const field = (tag: number, bytes: Buffer) => {
    head.length = 0;
    head.push(tag);
    pushVarint(head, bytes.length);
    return [Buffer.from(head), bytes];
  };
  const tail: number[] = [];
  if (limit > 0) { tail.push((3 << 3) | VARINT); pushVarint(tail, limit); }
  if (revision > 0) { tail.push((4 << 3) | VARINT); pushVarint(tail, revision); }
  return Buffer.concat([...field((1 << 3) | LEN, key), ...field((2 << 3) | LEN, rangeEnd), Buffer.from(tail)]);
}

/** A cursor over protobuf bytes. Integers are read as JS numbers (etcd revisions stay far below 2^53). */
class Reader {
  pos: number;
  constructor(readonly buf: Uint8Array, start: number, readonly end: number) { this.pos = start; }
  varint(): number {
    let n = 0;
    for (let mul = 1; ; mul *= 128) {
      if (this.pos >= this.end) throw new Error('truncated etcd range response');
      const b = this.buf[this.pos++]!;
      n += (b & 0x7f) * mul;
      if (b < 0x80) return n;
    }
  }
  /** Skips a field's value of wire type `type`; for LEN returns its start (its end is `pos`). */
  skip(type: number): number {
    switch (type) {
      case VARINT: this.varint(); return this.pos;
      case I64: this.pos += 8; return this.pos;
      case I32: this.pos += 4; return this.pos;
      case LEN: { const len = this.varint(); const start = this.pos; this.pos += len; return start; }
      default: throw new Error(`unexpected protobuf wire type ${type} in an etcd range response`);
    }
  }
}

/** What the fetching side needs of a page: the revision it was read at, whether more follow, and its last key. */
export interface RangePage { revision: number; more: boolean; kvs: number; lastKey: Buffer | undefined }

/** Reads a RangeResponse's header revision, `more` and last key, skipping over every key-value in between. */
export function scanRangeResponse(buf: Buffer): RangePage {
  const r = new Reader(buf, 0, buf.length);
  const page: RangePage = { revision: 0, more: false, kvs: 0, lastKey: undefined };
  let last = -1;
  let lastEnd = 0;
  while (r.pos < r.end) {
    const tag = r.varint();
    const type = tag & 7;
    if (type === VARINT) {
      const v = r.varint();
      if (tag >>> 3 === 3) page.more = v !== 0;
      continue;
    }
    const start = r.skip(type);
    if (type !== LEN) continue;
    if (tag >>> 3 === 1) {
      const h = new Reader(buf, start, r.pos);
      while (h.pos < h.end) {
        const t = h.varint();
        if (t === ((3 << 3) | VARINT)) page.revision = h.varint();
        else h.skip(t & 7);
      }
    } else if (tag >>> 3 === 2) {
      page.kvs++;
      last = start;
      lastEnd = r.pos;
    }
  }
  if (last >= 0) forEachField(buf, last, lastEnd, (field, s, e) => { if (field === 1) page.lastKey = buf.subarray(s, e); });
  return page;
}

/** Calls `fn` with each length-delimited field of the message in [start, end). */
function forEachField(buf: Uint8Array, start: number, end: number, fn: (field: number, start: number, end: number) => void): void {
  const r = new Reader(buf, start, end);
  while (r.pos < r.end) {
    const tag = r.varint();
    const s = r.skip(tag & 7);
    if ((tag & 7) === LEN) fn(tag >>> 3, s, r.pos);
  }
}

/** Calls `fn` with the key and value of each KeyValue of a RangeResponse, in order, as UTF-8 text. */
export function forEachKeyValue(buf: Buffer, fn: (key: string, value: string) => void): void {
  forEachField(buf, 0, buf.length, (field, s, e) => {
    if (field !== 2) return;
    let key = '';
    let value = '';
    forEachField(buf, s, e, (f, ks, ke) => {
      if (f === 1) key = buf.toString('utf8', ks, ke);
      else if (f === 5) value = buf.toString('utf8', ks, ke);
    });
    fn(key, value);
  });
}
