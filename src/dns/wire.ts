// DNS wire format on the hot path: a strict query parser, responses spliced from cached templates, dns-packet for records.
import packet from 'dns-packet';

export const rcode = { noerror: 0, formerr: 1, servfail: 2, nxdomain: 3, notimp: 4, refused: 5 } as const;
export const qtypes = { A: 1, NS: 2, SOA: 6, TXT: 16, AAAA: 28, OPT: 41, IXFR: 251, AXFR: 252, ANY: 255 } as const;

/** Largest UDP answer this server sends (and advertises in OPT): the DNS flag day 2020 size, safe under the mesh MTU. */
export const maxUdpPayload = 1232;
/** Length of the OPT record this server writes: root name, type, class, ttl, empty rdata. */
const optLength = 11;
const QR = 0x80; // in byte 2
const AA = 0x04; // in byte 2
const TC = 0x02; // in byte 2
const RD = 0x01; // in byte 2
const RA = 0x80; // in byte 3

export interface Edns {
  /** The client's UDP payload size, at least 512. */
  udpSize: number;
  version: number;
  dnssecOk: boolean;
}

/** A well-formed standard query with one question. */
export interface Query {
  /** The question's name in lowercase, labels joined by dots, no trailing dot ("" for the root). */
  name: string;
  qtype: number;
  qclass: number;
  /** Offset just past the question section: bytes 12..questionEnd are copied into answers as asked (case kept). */
  questionEnd: number;
  edns: Edns | undefined;
}

/** What to do with a packet: answer the query, answer with an error code only, or drop it silently. */
export type Parsed =
  | { kind: 'query'; query: Query }
  | { kind: 'error'; rcode: number; questionEnd: number | undefined; edns: Edns | undefined }
  | { kind: 'drop' };

const drop: Parsed = { kind: 'drop' };

/**
 * Parses a query strictly. Responses and packets too short for a header are dropped (answering them could start a
 * loop); anything else malformed is a FORMERR, other opcodes NOTIMP. Never throws.
 */
export function parseQuery(buf: Buffer): Parsed {
  if (buf.length < 12 || (buf[2]! & QR) !== 0) return drop;
  const opcode = (buf[2]! >> 3) & 0x0f;
  const qd = buf.readUInt16BE(4);
  const an = buf.readUInt16BE(6);
  const ns = buf.readUInt16BE(8);
  const ar = buf.readUInt16BE(10);
  if (opcode !== 0) return { kind: 'error', rcode: rcode.notimp, questionEnd: undefined, edns: undefined };
  const formerr: Parsed = { kind: 'error', rcode: rcode.formerr, questionEnd: undefined, edns: undefined };
  if (qd !== 1 || an !== 0 || ns !== 0) return formerr;
  // The question name: plain labels only (a compression pointer in a question is legal but never sent).
  let off = 12;
  let name = '';
  for (;;) {
    if (off >= buf.length) return formerr;
    const len = buf[off]!;
    if (len === 0) {
      off++;
      break;
    }
    if (len > 63 || off + 1 + len > buf.length) return formerr;
    const label = buf.toString('latin1', off + 1, off + 1 + len);
    if (label.includes('.')) return formerr;
    name = name === '' ? label : `${name}.${label}`;
    off += 1 + len;
  }
  if (off - 12 > 255 || off + 4 > buf.length) return formerr;
  const qtype = buf.readUInt16BE(off);
  const qclass = buf.readUInt16BE(off + 2);
  const questionEnd = off + 4;
  // The additional section: only OPT matters; every record must still be well-formed.
  let edns: Edns | undefined;
  off = questionEnd;
  for (let i = 0; i < ar; i++) {
    const nameStart = off;
    off = skipName(buf, off);
    if (off < 0 || off + 10 > buf.length) return { kind: 'error', rcode: rcode.formerr, questionEnd, edns: undefined };
    const type = buf.readUInt16BE(off);
    const rdlen = buf.readUInt16BE(off + 8);
    if (off + 10 + rdlen > buf.length) return { kind: 'error', rcode: rcode.formerr, questionEnd, edns: undefined };
    if (type === qtypes.OPT) {
      if (edns || off !== nameStart + 1) return { kind: 'error', rcode: rcode.formerr, questionEnd, edns: undefined };
      edns = { udpSize: Math.max(512, buf.readUInt16BE(off + 2)), version: buf[off + 5]!, dnssecOk: (buf[off + 6]! & 0x80) !== 0 };
    }
    off += 10 + rdlen;
  }
  return { kind: 'query', query: { name: name.toLowerCase(), qtype, qclass, questionEnd, edns } };
}

/** Offset after a (possibly compressed) name starting at `off`, or -1 when it runs past the packet. */
function skipName(buf: Buffer, off: number): number {
  for (let guard = 0; guard < 128; guard++) {
    if (off >= buf.length) return -1;
    const len = buf[off]!;
    if (len === 0) return off + 1;
    if ((len & 0xc0) === 0xc0) return off + 2 <= buf.length ? off + 2 : -1;
    if ((len & 0xc0) !== 0) return -1;
    off += 1 + len;
  }
  return -1;
}

/**
 * A response without its question: a 12-byte header (id 0, question count 1) followed by the answer, authority and
 * additional sections. Encoded once per name and reused for every query that asks it (see `spliceResponse`).
 */
export type Template = Buffer;

/** Encodes a template with dns-packet: authoritative, recursion available, `records`, `authorities`, OPT when `edns`. */
export function encodeTemplate(code: number, answers: packet.Answer[], authorities: packet.Answer[], edns: boolean): Template {
  const encoded = packet.encode({
    type: 'response', id: 0, flags: packet.AUTHORITATIVE_ANSWER | packet.RECURSION_AVAILABLE | code,
    questions: [], answers, authorities,
    additionals: edns ? [{ type: 'OPT', name: '.', udpPayloadSize: maxUdpPayload, extendedRcode: 0, ednsVersion: 0, flags: 0, flag_do: false, options: [] }] : [],
  });
  encoded.writeUInt16BE(1, 4);
  return encoded;
}

/** The answer to `query` (packet `buf`) from a template: its id, RD and DO bits, its question as it was asked. */
export function spliceResponse(tpl: Template, buf: Buffer, query: Query): Buffer {
  const qlen = query.questionEnd - 12;
  const out = Buffer.allocUnsafe(tpl.length + qlen);
  tpl.copy(out, 0, 0, 12);
  buf.copy(out, 12, 12, query.questionEnd);
  tpl.copy(out, 12 + qlen, 12);
  out[0] = buf[0]!;
  out[1] = buf[1]!;
  out[2] = out[2]! | (buf[2]! & RD);
  if (query.edns?.dnssecOk) out[out.length - 4] = out[out.length - 4]! | 0x80;
  return out;
}

/**
 * A response with no records: the query's id, opcode and RD bit, `code`, the question when it was parsed, and an
 * OPT record when the query had one (BADVERS goes in the OPT's extended code). TC marks a truncated UDP answer.
 */
export function headerResponse(buf: Buffer, code: number, questionEnd: number | undefined, edns: Edns | undefined, opts: { truncated?: boolean; authoritative?: boolean; extendedRcode?: number } = {}): Buffer {
  const qlen = questionEnd === undefined ? 0 : questionEnd - 12;
  const out = Buffer.alloc(12 + qlen + (edns ? optLength : 0));
  out[0] = buf[0]!;
  out[1] = buf[1]!;
  out[2] = QR | (buf[2]! & (0x78 | RD)) | (opts.truncated ? TC : 0) | (opts.authoritative ? AA : 0);
  out[3] = (code === rcode.refused ? 0 : RA) | (code & 0x0f);
  out.writeUInt16BE(qlen > 0 ? 1 : 0, 4);
  out.writeUInt16BE(edns ? 1 : 0, 10);
  if (qlen > 0) buf.copy(out, 12, 12, questionEnd);
  if (edns) writeOpt(out, 12 + qlen, opts.extendedRcode ?? 0, edns.dnssecOk);
  return out;
}

function writeOpt(out: Buffer, off: number, extendedRcode: number, dnssecOk: boolean): void {
  out[off] = 0;
  out.writeUInt16BE(qtypes.OPT, off + 1);
  out.writeUInt16BE(maxUdpPayload, off + 3);
  out[off + 5] = extendedRcode;
  out[off + 6] = 0;
  out[off + 7] = dnssecOk ? 0x80 : 0;
  out[off + 8] = 0;
  out.writeUInt16BE(0, off + 9);
}

/** The UDP size a response to `query` may take. */
export function udpLimit(query: Query): number {
  return query.edns ? Math.min(query.edns.udpSize, maxUdpPayload) : 512;
}
